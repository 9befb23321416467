"""Our speed beside the official PyTorch code's, case by case, on this machine (CPU, fp32): one JSON and one table.

The cases are those of ../shared/official_bench (same shapes, same inputs where the official uses fixtures):
  a  VAREdit train step, `varedit_transformer` fixture (C 128, depth 3, SAR, B 2, 777 tokens, full-block remat,
     drop path, text dropout, per-bit CE, AdamW)         tokens/s          target >= 2x the official
  b  Infinity train step, `infinity_transformer` fixture (B 2, 521 tokens)          tokens/s    target >= 2x
  c  one 2B block forward + backward (C 2048, L 777, 64 text tokens)   seconds; GFLOP/s over OUR matmul peak
                                                                        (case e, same run)  target >= 0.85
  d  the `varedit_sampling` fixture sampler (pn 0.06M, SAR, cfg 4, argmax): edits/s at batch 1 (target >= 2x the
     official) and per edit at batch 8 (target >= 3x the official batch 1: the official sampler cannot batch)
  e  fp32 2048^2 matmul GFLOP/s (median and best; the practical peak of each side)
Floor: not behind the official on any case (a, b, c, d). Ours: `transformer.fixture_train_step`, `transformer.
block_case`, `sampler.fixture_sampling`, `transformer.matmul_peak` (benchmarks/), timed as the official tool times
(warm-up, then the median of --repeats).

  INFINITY_SRC=... VAREDIT_SRC=... python ../shared/official_bench/official_bench.py > official_before.json
  python benchmarks/compare_official.py --official official_before.json official_after.json
  INFINITY_SRC=... VAREDIT_SRC=... python ../shared/official_bench/official_bench.py > official_after.json
(run the official tool right before and right after this one, nothing else on the machine; the faster official
figure per case is used). Without --official the figures of ../shared/reference/official_cpu_baseline.md are used
and marked as measured on another machine. Writes benchmarks/results/compare_official.{json,md}.
"""
import argparse
import json
import os
import pathlib
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")

REPO = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import common  # noqa: E402
import sampler as sampler_bench  # noqa: E402
import transformer as transformer_bench  # noqa: E402

# ../shared/reference/official_cpu_baseline.md (torch 2.13, 2 cores, fp32; another machine than this one).
BASELINE_NOTE = {
    "varedit_tiny_train_step": {"seconds_per_step": 0.186, "tokens_per_s": 2 * 777 / 0.186},
    "infinity_tiny_train_step": {"seconds_per_step": 0.096, "tokens_per_s": 2 * 521 / 0.096},
    "block_2b_fwd_bwd": {"seconds": 1.98, "gflops_per_s": 148.0},
    "varedit_tiny_sample": {"seconds_per_edit": 0.048},
    "matmul_peak": {"gflops_per_s": 195.0, "best_gflops_per_s": 195.0},
}
FASTER = {"varedit_tiny_train_step": ("seconds_per_step", min), "infinity_tiny_train_step": ("seconds_per_step", min),
          "block_2b_fwd_bwd": ("seconds", min), "varedit_tiny_sample": ("seconds_per_edit", min),
          "matmul_peak": ("gflops_per_s", max)}
TARGETS = {"a": 2.0, "b": 2.0, "c_fraction": 0.85, "d_batch1": 2.0, "d_batch8": 3.0}
REPEATS = {"a": 10, "b": 10, "c": 5, "d": 10, "e": 20}


def official_figures(paths: list[str]) -> tuple[dict, str]:
    """Per case the faster official figure over the given official_bench JSONs (or the baseline note's)."""
    if not paths:
        return BASELINE_NOTE, "../shared/reference/official_cpu_baseline.md (ANOTHER machine: compare with care)"
    runs = []
    for path in paths:
        try:
            runs.append(json.loads(pathlib.Path(path).read_text())["cases"])
        except (OSError, ValueError, KeyError) as e:
            raise SystemExit(f"error: {path} is not an official_bench JSON ({type(e).__name__}: {e})")
    out = {}
    for case, (key, pick) in FASTER.items():
        found = [r[case] for r in runs if case in r and key in r[case]]
        if not found:
            raise SystemExit(f"error: no official figure for case {case} in {paths} (failed or not selected)")
        out[case] = pick(found, key=lambda c: c[key])
    return out, "official_bench on this machine: " + ", ".join(paths) + " (faster figure per case)"


def run_ours(repeats: dict) -> dict:
    """Our side of every case (fixtures from tests/fixtures)."""
    ours = {}
    for case, folder in (("a", "varedit_transformer"), ("b", "infinity_transformer")):
        row = transformer_bench.fixture_train_step(folder, repeats=repeats[case])
        if row is None:
            raise SystemExit(f"error: fixture tests/fixtures/{folder} is missing")
        ours[case] = row
        print(f"[ours] {case}: {row['seconds_per_step']:.4f} s/step", flush=True)
    ours["c"] = transformer_bench.block_case(repeats=repeats["c"])
    print(f"[ours] c: {ours['c']['seconds']:.3f} s", flush=True)
    ours["d"] = sampler_bench.fixture_sampling((1, 8), repeats["d"])
    if ours["d"] is None:
        raise SystemExit("error: fixture tests/fixtures/varedit_sampling is missing")
    ours["e"] = transformer_bench.matmul_peak(repeats=repeats["e"])
    print(f"[ours] e: {ours['e']['gflops_per_s']:.1f} GFLOP/s", flush=True)
    return ours


def table_rows(ours: dict, official: dict) -> list[dict]:
    """One row per compared figure: both sides, ours ÷ official as a speed ratio, the target and whether it holds."""
    a, b, c, e = ours["a"], ours["b"], ours["c"], ours["e"]
    d1, d8 = ({r["batch"]: r for r in ours["d"]["runs"]}[k] for k in (1, 8))
    off_edit = official["varedit_tiny_sample"]["seconds_per_edit"]
    off_block = official["block_2b_fwd_bwd"]
    rows = [
        dict(case="a VAREdit train step (fixture, B 2, 777 tokens)", unit="tokens/s",
             official=official["varedit_tiny_train_step"]["tokens_per_s"], ours=a["tokens_per_s"], target=TARGETS["a"]),
        dict(case="b Infinity train step (fixture, B 2, 521 tokens)", unit="tokens/s",
             official=official["infinity_tiny_train_step"]["tokens_per_s"], ours=b["tokens_per_s"],
             target=TARGETS["b"]),
        dict(case="c 2B block fwd+bwd (L 777)", unit="1/s", official=1.0 / off_block["seconds"],
             ours=1.0 / c["seconds"], target=1.0),
        dict(case="c 2B block: fraction of own matmul peak (median)", unit="fraction",
             official=off_block["gflops_per_s"] / official["matmul_peak"]["gflops_per_s"],
             ours=c["gflops_per_s"] / e["gflops_per_s"], target=TARGETS["c_fraction"], absolute=True),
        dict(case="d sampler, batch 1", unit="edits/s", official=1.0 / off_edit, ours=d1["edits_per_s"],
             target=TARGETS["d_batch1"]),
        dict(case="d sampler, batch 8 (per edit; official: batch 1)", unit="edits/s", official=1.0 / off_edit,
             ours=d8["edits_per_s"], target=TARGETS["d_batch8"]),
        dict(case="e fp32 matmul 2048^2 (median)", unit="GFLOP/s", official=official["matmul_peak"]["gflops_per_s"],
             ours=e["gflops_per_s"], target=None),
    ]
    for row in rows:
        row["ratio"] = row["ours"] / row["official"]
        value = row["ours"] if row.pop("absolute", False) else row["ratio"]
        row["met"] = None if row["target"] is None else bool(value >= row["target"])
        row["floor_held"] = None if row["target"] is None or row["unit"] == "fraction" else bool(row["ratio"] >= 1.0)
    return rows


def markdown(rows: list[dict], source: str, ours: dict) -> str:
    lines = [f"Official: {source}. Ours: matmul {ours['e']['gflops_per_s']:.1f} GFLOP/s median, "
             f"{ours['e']['best_gflops_per_s']:.1f} best, in this run.", "",
             "| case | unit | official | ours | ours ÷ official | target | met |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        target = "" if r["target"] is None else (f"≥ {r['target']:g}" + ("" if r["unit"] == "fraction" else "×"))
        met = "" if r["met"] is None else ("yes" if r["met"] else "NO")
        lines.append(f"| {r['case']} | {r['unit']} | {r['official']:.4g} | {r['ours']:.4g} | {r['ratio']:.2f}× | "
                     f"{target} | {met} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--official", nargs="*", default=[], help="official_bench JSONs (before / after this run)")
    parser.add_argument("--repeats", type=int, default=None, help="timed repeats of every case (default: as the "
                        "official tool, a b d 10, c 5, e 20)")
    parser.add_argument("--out", default=str(REPO / "benchmarks/results/compare_official.json"))
    args = parser.parse_args()
    official, source = official_figures(args.official)  # fails before the long run on a bad file
    repeats = {k: args.repeats or v for k, v in REPEATS.items()}
    ours = run_ours(repeats)
    rows = table_rows(ours, official)
    table = markdown(rows, source, ours)
    out = pathlib.Path(args.out)
    common.write({"official_source": source, "official": official, "ours": ours, "table": rows,
                  "targets": TARGETS}, out)
    out.with_suffix(".md").write_text(table)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
