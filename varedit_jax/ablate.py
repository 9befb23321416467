"""Ablation sweeps over the source conditioning (the paper's Table 3): train one model per conditioning (full /
finest / sar) with the same budget, seeds and data order, evaluate each, and write one table.

  python -m varedit_jax.ablate                                    # the tiny CPU sweep on the toy task
  python -m varedit_jax.ablate --config CFG --conditioning full,finest,sar --workdir DIR [--seeds 0,1,2]
      [--eval-pairs 64] [--guidance 4] [--tau 0.5] [--config.FIELD=VALUE ...]
  python -m varedit_jax.ablate --config configs/varedit_2b_256.py --plan-only     # no training: lengths, sizes, FLOPs
  python -m varedit_jax.ablate ... --benchmark emu_edit --data DIR [--clip DIR] [--judge URL ...]   # on a benchmark

Runs live in DIR/<conditioning>/seed<k>/ (training workdirs: an interrupted sweep resumes each run where it stopped; a
finished run is not retrained and a finished evaluation, cached in eval.json, is not redone). Evaluation edits the
held-out toy pairs (`eval_data`, whose exact targets and edit masks are known) with the trained checkpoint and scores
them with `eval.toy_metrics` (success / preservation / balance on 0-10, the copy-the-source and oracle rows beside).
Outputs: DIR/results.{md,csv,json} (rows per conditioning and seed, mean ± std over seeds), DIR/grids/*.png (source |
target | output with the instruction) per run and DIR/curves.png (loss and bit accuracy of every run, a panel each).
On a TPU pod (`--distributed`, as `launch/ablate.sh --tpu ...` runs it) every process trains and edits together and
process 0 writes; DIR must then be a filesystem every host shares.
With `--benchmark` (and `evaluate`'s data / metric-model flags) each run is instead evaluated on that benchmark by
`evaluate.Evaluation` into RUN/eval_<benchmark>/ (resumable as `evaluate` is), and the table holds each run's overall
row of the benchmark's metrics (no reference rows).
"""
import argparse
import dataclasses
import json
import math
import pathlib
import sys

import jax
import ml_collections
import numpy as np
from etils import epath
from flax import nnx

from varedit_jax import (assets, checkpoint, conditioning, configlib, distributed, editor, evaluate, loading, metrics,
                         plan, sampler, storage, toy_eval, train, train_config, transformer)
from varedit_jax.eval import report, suites
from varedit_jax.train_step import sequence_layout

REPO = pathlib.Path(__file__).resolve().parent.parent
DEFAULT_CONFIG = REPO / "configs" / "varedit_tiny.py"


def run_config(config: ml_collections.ConfigDict, mode: str, seed: int) -> ml_collections.ConfigDict:
    return configlib.override(config, {"conditioning": mode, "seed": seed})


def plan_rows(config: ml_collections.ConfigDict, modes, template: str = "1.0") -> list[dict]:
    """Rows that need no training: input length, parameters, analytic FLOPs per train step and per edit (CFG: the
    batch of 2, every token through every block once; dense attention)."""
    abstract = nnx.eval_shape(lambda: transformer.Infinity(config.model, rngs=nnx.Rngs(0)))
    n_params = sum(math.prod(x.shape) for x in jax.tree.leaves(transformer.param_dict(abstract)))
    rows = []
    for mode in modes:
        c = run_config(config, mode, config.seed)
        edit = configlib.override(c, {"batch_size": 2, "model.remat": "none"})
        rows.append({"conditioning": mode, "input_length": sequence_layout(c, template).length,
                     "parameters": n_params, "train_flops_per_step": f"{plan.analytic_flops(c, template):.3e}",
                     "flops_per_edit": f"{plan.analytic_flops(edit, template, passes=1):.3e}"})
    return rows


def evaluate_run(run: epath.Path, eval_set: dict, options: sampler.SamplingOptions, grid: epath.Path) -> dict:
    """Edits the eval set with the run's newest checkpoint; per-run row (cached in RUN/eval.json)."""
    root, step = checkpoint.resolve(run)
    cache = run / "eval.json"
    if cache.is_file():
        cached = json.loads(cache.read_text())
        if cached.get("checkpoint_step") == step and cached.get("n") == len(eval_set["instruction"]):
            return cached
    row, outputs = toy_eval.edit_and_score(editor.Editor.from_checkpoint(run), eval_set, options)
    row.update(checkpoint_step=step)
    if jax.process_index() == 0:  # every process edits (the sampler spans all devices); one writes
        k = min(8, row["n"])
        report.save_grid(grid, list(eval_set["source"][:k]), eval_set["instruction"][:k], list(outputs[:k]),
                         targets=list(eval_set["target"][:k]), title=run.parent.name + " / " + run.name)
        storage.write_text(cache, json.dumps(row, indent=1) + "\n")
    return row


def reference_rows(config, eval_set: dict) -> list[dict]:
    """copy-the-source and oracle (the tokenizer's reconstruction of the true target) rows."""
    return toy_eval.reference_rows(loading.load_image_tokenizer(config.image_tokenizer.path), config.pn, eval_set)


def _mean_std(rows: list[dict], mode: str, keys) -> dict:
    out = {"conditioning": mode, "seed": "mean ± std"}
    for k in ("input_length", "train_step_s", "final_loss", "s_per_edit", *keys):
        values = np.array([r[k] for r in rows if r.get(k) is not None], float)
        if len(values):
            out[k] = f"{values.mean():.3f} ± {values.std():.3f}" if k != "input_length" else int(values[0])
    return out


@dataclasses.dataclass(frozen=True)
class Benchmark:
    """`--benchmark`: evaluate each run with `evaluate.Evaluation` (these settings, the run's seed) and models."""
    settings: evaluate.Settings
    models: suites.MetricModels

    def evaluate_run(self, run: pathlib.Path, seed: int) -> dict:
        """The run's overall row of the benchmark (its first overall row: GEdit's first language)."""
        settings = dataclasses.replace(self.settings, seed=seed)
        table = evaluate.Evaluation(run, run / f"eval_{settings.benchmark}", settings, self.models).run(progress=False)
        overall = next(r for r in table if r["category"].startswith("overall"))
        return {k: v for k, v in overall.items() if k != "category"}

    def keys(self) -> list[str]:
        return [c for c in suites.columns(self.settings.benchmark) if c not in ("category", "n", "s_per_edit")]


def sweep(config: ml_collections.ConfigDict, modes, seeds, workdir, *, eval_pairs: int,
          options: sampler.SamplingOptions, benchmark: Benchmark | None = None) -> list[dict]:
    """Trains / evaluates every (conditioning, seed) run; writes and returns the table rows."""
    workdir = storage.path(workdir)
    config = assets.resolve(config)
    eval_set = toy_eval.eval_pairs(config.eval_data.paths, eval_pairs) if benchmark is None else None
    keys = list(toy_eval.COLUMNS) if benchmark is None else benchmark.keys()
    rows, per_mode = [], {}
    for mode in modes:
        for seed in seeds:
            run = workdir / mode / f"seed{seed}"
            c = run_config(config, mode, seed)
            print(f"== {mode} seed {seed}: {run}", flush=True)
            summary = train.train(c, run)
            if benchmark is None:
                ev = evaluate_run(run, eval_set, dataclasses.replace(options, seed=seed),
                                  grid=workdir / "grids" / f"{mode}_seed{seed}.png")
            else:
                ev = benchmark.evaluate_run(run, seed)
            row = {"conditioning": mode, "seed": seed, "input_length": sequence_layout(c, c.data.templates[0]).length,
                   "steps": summary["step"], "train_step_s": summary["step_time_s"],
                   "final_loss": summary["final_loss"], "s_per_edit": ev.get("s_per_edit"),
                   **{k: ev.get(k) for k in keys}, "n": ev["n"]}
            rows.append(row)
            per_mode.setdefault(mode, []).append(row)
    if len(seeds) > 1:
        rows += [_mean_std(r, s, keys) for s, r in per_mode.items()]
    if benchmark is None:
        rows += reference_rows(config, eval_set)
    if jax.process_index() != 0:
        return rows
    columns = ["conditioning", "seed", "input_length", "steps", "train_step_s", "final_loss", "s_per_edit", *keys, "n"]
    what = f"{eval_pairs} held-out pairs" if benchmark is None else benchmark.settings.benchmark
    paths = report.write_table(rows, workdir, "results", columns=columns,
                               title=f"Conditioning ablation ({config.pn}, {len(seeds)} seed(s), {what}, "
                                     f"guidance {options.guidance}, tau {options.tau})")
    curves = metrics.save_curves({f"{m} seed {k}": workdir / m / f"seed{k}" / "metrics.jsonl" for m in modes
                                  for k in seeds}, workdir / "curves.png", title=f"Conditioning ablation ({config.pn})")
    print(paths["md"].read_text())
    grids = workdir / "grids" if benchmark is None else workdir / "<conditioning>/seed<k>/eval_*/grid.png"
    print(f"tables: {paths['md']} {paths['csv']} {paths['json']}\ngrids: {grids}\nlearning curves: {curves}",
          flush=True)
    return rows


def _ints(value: str) -> list[int]:
    try:
        out = [int(v) for v in value.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {value!r}") from None
    if not out or any(v < 0 for v in out):
        raise argparse.ArgumentTypeError(f"expected non-negative integers, got {value!r}")
    return out


def _modes(value: str) -> list[str]:
    out = [v.strip() for v in value.split(",") if v.strip()]
    unknown = [v for v in out if v not in conditioning.EDITING_MODES]
    if not out or unknown:
        raise argparse.ArgumentTypeError(f"unknown conditioning {unknown or value!r}; choose from "
                                         f"{','.join(conditioning.EDITING_MODES)}")
    return out


def _benchmark(args, config: ml_collections.ConfigDict) -> Benchmark:
    data = args.data or (",".join(assets.resolve(config).eval_data.paths) if args.benchmark == "toy" else None)
    if not data:
        raise ValueError(f"--benchmark {args.benchmark} needs --data (the benchmark's local copy)")
    settings = evaluate.Settings(args.benchmark, data, args.guidance, args.tau, 0, args.resolution, args.preprocess,
                                 args.language, args.limit, args.batch_size)
    models = evaluate.load_models(args.benchmark, clip=args.clip, dino=args.dino, lpips=args.lpips,
                                  judge_url=args.judge, judge_model=args.judge_model, data=data,
                                  cache_dir=str(pathlib.Path(args.workdir) / "judge_cache"))
    return Benchmark(settings, models)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m varedit_jax.ablate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(DEFAULT_CONFIG), help="training config (configs/*.py)")
    parser.add_argument("--conditioning", type=_modes, default=list(conditioning.EDITING_MODES),
                        help="comma-separated conditioning modes to compare (default full,finest,sar)")
    parser.add_argument("--seeds", type=_ints, default=[0])
    parser.add_argument("--workdir", default="runs/ablate_tiny")
    parser.add_argument("--eval-pairs", type=int, default=None, help="held-out pairs to edit (default toy.eval_pairs)")
    parser.add_argument("--guidance", type=float, default=sampler.DEFAULT_GUIDANCE)
    parser.add_argument("--tau", type=float, default=sampler.DEFAULT_TAU)
    parser.add_argument("--plan-only", action="store_true", help="print the rows that need no training and exit")
    parser.add_argument("--benchmark", choices=suites.BENCHMARKS, help="evaluate on this benchmark (`evaluate`) "
                        "instead of the toy held-out pairs")
    evaluate.add_model_flags(parser)
    parser.add_argument("--distributed", action="store_true", help="jax.distributed.initialize() (TPU pods)")
    parser.add_argument("--coordinator", help="coordinator HOST:PORT of an explicit multi-process run")
    parser.add_argument("--num_processes", type=int, help="processes of an explicit multi-process run")
    parser.add_argument("--process_id", type=int, help="this process's index in an explicit multi-process run")
    args, overrides = parser.parse_known_args(argv)
    try:
        config = configlib.override(configlib.load(args.config), configlib.parse_overrides(overrides))
        train_config.validate(config)
        if args.plan_only:
            print(report.markdown_table(plan_rows(config, args.conditioning)))
            return 0
        distributed.init_distributed([config], args.distributed, args.coordinator, args.num_processes, args.process_id)
        sweep(config, args.conditioning, args.seeds, args.workdir, eval_pairs=args.eval_pairs or config.toy.eval_pairs,
              options=sampler.SamplingOptions(guidance=args.guidance, tau=args.tau),
              benchmark=_benchmark(args, config) if args.benchmark else None)
    except (ValueError, KeyError, FileNotFoundError, ImportError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
