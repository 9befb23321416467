"""Sampler speed on this machine (fp32, one device), JSON output: seconds per edit and edits/s at batch 1 and batched,
compile time separately (first call - steady-state call = trace + lower + XLA compile).

Sections (`--sections`, comma-separated; all by default):
  fixture   the official CPU baseline's case: `fixtures/varedit_sampling` weights (imported by the converter), pn
            0.06M SAR layout, cfg 4, tau 0.5, argmax (the fixture's own text and source); official: 0.048 s per
            edit at batch 1 (torch 2.13 CPU, 2 cores; batch > 1 is not supported by the official sampler).
  tiny      `configs/varedit_tiny.py` shapes, random weights, 256 px layout (777 tokens), top_p 0.97 sampling.
  2b_256    2B shapes (C 2048, 16 heads, FFN 8192, d 32), random weights, 256 px; depth `--depth_2b` (default
            1 and 2 blocks, each measured, plus a linear extrapolation to the 32 blocks of the released model --
            full depth needs ~9 GB of fp32 weights: `--depth_2b 32`).
  2b_512    a depth-2 slice of the 2B shapes at 512 px (10 scales, 3545 tokens); batch 1 (`--batches_512 1,2`
            adds the batched run, ~1 more minute).
Text: 64 random feature tokens per prompt; source: random features. The sampler only (no tokenizer / T5), as the
official figure.
  python benchmarks/sampler.py [--sections fixture,tiny] [--out benchmarks/results/sampler.json]
"""
import argparse
import json
import os
import pathlib
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import numpy as np  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import common  # noqa: E402
from varedit_jax import conditioning, configlib, loading, sampler, schedules, transformer  # noqa: E402

OFFICIAL_S_PER_EDIT = 0.048  # ../shared/reference/official_cpu_baseline.md, fixture config, batch 1
TEXT_LEN = 64


def _measure(s: sampler.Sampler, layout, inputs: tuple, batch: int, iters: int, **opts) -> dict:
    """Times `s.sample` on the first `batch` rows of inputs: compile (first call - steady) and steady seconds."""
    text, mask, source = (None if a is None else a[:batch] for a in inputs)

    def call():
        return jax.block_until_ready(s.sample(layout, text, mask, source, with_logits=False, **opts))

    t0 = time.perf_counter()
    call()
    first = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(iters):
        call()
    steady = (time.perf_counter() - t0) / iters
    return {"batch": batch, "s_per_batch": steady, "s_per_edit": steady / batch, "edits_per_s": batch / steady,
            "compile_s": max(first - steady, 0.0), "iters": iters}


def _random_inputs(model_cfg, layout, batch: int, seed: int = 0) -> tuple:
    rng = np.random.default_rng(seed)
    text = rng.normal(size=(batch, min(TEXT_LEN, model_cfg.text_max_len), model_cfg.text_dim)).astype(np.float32)
    mask = np.ones(text.shape[:2], bool)
    source = rng.normal(size=(batch,) + layout.source_grid + (model_cfg.bits,)).astype(np.float32)
    return text, mask, source


def _run_random(model_cfg, schedule, batches, iters: int) -> list[dict]:
    t0 = time.perf_counter()
    model = transformer.build(model_cfg)
    built = time.perf_counter() - t0
    s = sampler.Sampler.from_model(model, sampler.inference_mesh(jax.devices()[:1]))
    layout = conditioning.sequence_layout("sar", schedule)
    inputs = _random_inputs(model_cfg, layout, max(batches))
    rows = []
    for b in batches:
        row = _measure(s, layout, inputs, b, iters, options=sampler.SamplingOptions(guidance=4.0, tau=0.5))
        row.update(tokens=layout.length, depth=model_cfg.depth, init_s=built)
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def fixture_sampling(batches, repeats: int) -> dict | None:
    """The official CPU benchmark's case d: the `varedit_sampling` fixture's weights, text and source (repeated to
    the batch), its sampling settings (cfg 4, tau 0.5, top_k 1), pn 0.06M SAR; per batch size the median seconds
    per batch / per edit over `repeats` calls after a warm-up. `bits_match_fixture_sample0`: the first edit's bits
    equal the official sampler's. None when the fixture is absent."""
    folder = REPO / "tests" / "fixtures" / "varedit_sampling"
    if not (folder / "config.json").is_file():
        return None
    cfg = json.loads((folder / "config.json").read_text())
    z = np.load(folder / "io.npz")
    _, model = loading.load_transformer(folder / cfg["weights"], kind="varedit")
    layout = conditioning.sequence_layout("sar", schedules.as_schedule(z["scale_schedule"]))
    lens = z["text_lens"]
    t = int(lens.max())
    text = np.zeros((len(lens), t, z["text_kv_compact_concat"].shape[1]), np.float32)
    starts = np.concatenate([[0], np.cumsum(lens)])
    for i, n in enumerate(lens):
        text[i, :n] = z["text_kv_compact_concat"][starts[i]:starts[i] + n]
    mask = np.arange(t)[None] < lens[:, None]
    n, _, d = z["source_prefix"].shape
    source = z["source_prefix"].reshape((n,) + layout.source_grid + (d,))
    kw = cfg["autoregressive_infer_cfg_kwargs"]
    options = sampler.SamplingOptions(guidance=kw["cfg_list"], tau=kw["tau_list"], top_k=kw["top_k"],
                                      top_p=kw["top_p"])
    s = sampler.Sampler.from_model(model, sampler.inference_mesh(jax.devices()[:1]))
    reps = -(-max(batches) // n)
    text, mask, source = (np.concatenate([a] * reps) for a in (text, mask, source))
    runs = []
    for b in batches:
        def call(b=b):
            return jax.block_until_ready(s.sample(layout, text[:b], mask[:b], source[:b], options=options,
                                                  with_logits=False))
        t0 = time.perf_counter()
        out = call()
        first = time.perf_counter() - t0
        timing = common.median_seconds(call, repeats=repeats, warmup=0)
        runs.append({"batch": b, "seconds_per_batch": timing["median_s"], "seconds_per_edit": timing["median_s"] / b,
                     "edits_per_s": b / timing["median_s"], "compile_s": max(first - timing["median_s"], 0.0),
                     "bits_match_fixture_sample0": bool((np.asarray(out.bits[0]) == z["bits"][0]).all()),
                     "timing": timing})
        print(json.dumps(runs[-1]), flush=True)
    return {"tokens": layout.length, "runs": runs}


def section_fixture(args) -> dict:
    out = fixture_sampling((1, args.batch), args.iters_small)
    if out is None:
        return {"skipped": "fixture varedit_sampling absent"}
    for row in out["runs"]:
        row["vs_official_batch1 (baseline note, another machine)"] = row["seconds_per_edit"] / OFFICIAL_S_PER_EDIT
    return {"official_s_per_edit_batch1": OFFICIAL_S_PER_EDIT, **out}


def section_tiny(args) -> dict:
    config = configlib.load(str(REPO / "configs" / "varedit_tiny.py"))
    model_cfg = transformer.default_model_config(**dict(config.model.items()))
    return {"runs": _run_random(model_cfg, schedules.scale_schedule("1.0", "0.06M"), (1, args.batch),
                                args.iters_small)}


def _two_b(depth: int):
    return transformer.default_model_config(**dict(transformer.OFFICIAL_SHAPES["2b"], depth=depth, block_chunks=1,
                                                   text_max_len=TEXT_LEN, remat="none", drop_path_rate=0.0))


def section_2b_256(args) -> dict:
    depths = [int(d) for d in args.depth_2b.split(",")]
    out = {"runs": {}}
    for depth in depths:
        out["runs"][f"depth{depth}"] = _run_random(_two_b(depth), schedules.scale_schedule("1.0", "0.06M"),
                                                   (1, 2), args.iters_big)
    if len(depths) >= 2 and 32 not in depths:  # linear in depth: per-block cost + the rest
        lo, hi = min(depths), max(depths)
        est = {}
        for i, b in enumerate((1, 2)):
            t_lo, t_hi = out["runs"][f"depth{lo}"][i]["s_per_edit"], out["runs"][f"depth{hi}"][i]["s_per_edit"]
            per_block = (t_hi - t_lo) / (hi - lo)
            est[f"batch{b}_s_per_edit"] = t_lo + per_block * (32 - lo)
        out["extrapolated_depth32"] = est
    return out


def section_2b_512(args) -> dict:
    batches = tuple(int(b) for b in args.batches_512.split(","))
    return {"runs": _run_random(_two_b(2), schedules.scale_schedule("1.0", "0.25M"), batches, args.iters_big)}


SECTIONS = {"fixture": section_fixture, "tiny": section_tiny, "2b_256": section_2b_256, "2b_512": section_2b_512}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sections", default=",".join(SECTIONS))
    p.add_argument("--batch", type=int, default=8, help="batched size of the fixture / tiny sections")
    p.add_argument("--depth_2b", default="1,2", help="block counts of the 2B-256 runs (comma-separated)")
    p.add_argument("--batches_512", default="1", help="batch sizes of the 2B-512 slice (e.g. 1,2; batch 2 adds ~35 s "
                   "plus a compile each on 2 cores)")
    p.add_argument("--iters_small", type=int, default=5)
    p.add_argument("--iters_big", type=int, default=1)
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "sampler.json"))
    args = p.parse_args()
    result = {"dtype": "float32", "text_tokens": TEXT_LEN}
    for name in args.sections.split(","):
        if name not in SECTIONS:
            raise SystemExit(f"unknown section {name!r}; known: {', '.join(SECTIONS)}")
        print(f"== {name}", flush=True)
        t0 = time.perf_counter()
        result[name] = SECTIONS[name](args)
        result[name]["section_s"] = time.perf_counter() - t0
    common.write(result, args.out)


if __name__ == "__main__":
    main()
