"""Multi-stage training recipes in one command (the paper's 2B: 256 px, then 512 px from stage 1).

  python -m varedit_jax.recipe --recipe configs/recipe_varedit_2b.py --workdir gs://bucket/runs/2b \
      [--config.FIELD=VALUE ...] [--distributed | --coordinator HOST:PORT --num_processes N --process_id I]

A recipe file's `get_config()` returns a ConfigDict with `stages`, each:
  name          the stage's folder: WORKDIR/<k>_<name> (k = 1, 2, ...), a normal resumable training workdir
  config        a training config file (configs/*.py[:arg]; relative to the cwd or the repository)
  overrides     {"field": value} applied to that config (then the command line's --config.FIELD=VALUE, which apply
                to every stage)
  init          "previous": start from the previous stage's final weights (sets init_checkpoint), or "" (the
                config's own init_checkpoint)
  init_weights  "ema" / "params" of the previous stage, or "" (its EMA when it kept one: optim.ema_decay > 0)
Stages run in order; a finished stage (its newest checkpoint at total_steps) is skipped, so re-running the same
command after a kill or a preemption continues in the stage where it stopped. A preempted stage ends the command
(exit 0) without starting the next.
"""
import argparse
import pathlib
import sys

import ml_collections

from varedit_jax import checkpoint, configlib, distributed, storage, train

REPO = pathlib.Path(__file__).resolve().parent.parent  # stage config paths are relative to it (or to the cwd)


def stage_configs(recipe: ml_collections.ConfigDict, workdir, overrides: dict
                  ) -> list[tuple[str, ml_collections.ConfigDict]]:
    """(stage workdir, its training config) of every stage, init_checkpoint / init_weights filled in."""
    out, previous = [], None
    for k, stage in enumerate(recipe.stages, 1):
        stage = dict(stage)
        name, file, init = stage["name"], stage["config"], stage.get("init", "")
        file = file if pathlib.Path(file.partition(":")[0]).exists() else f"{REPO / file}"
        config = configlib.override(configlib.load(file), {**dict(stage.get("overrides") or {}), **overrides})
        if init == "previous":
            if previous is None:
                raise ValueError(f"stage {name}: init 'previous' but it is the first stage")
            prev_dir, prev_config = previous
            config.init_checkpoint = prev_dir
            config.init_weights = stage.get("init_weights") or ("ema" if prev_config.optim.ema_decay > 0 else "params")
        elif init:
            raise ValueError(f"stage {name}: init must be 'previous' or empty, got {init!r}")
        stage_dir = str(storage.path(workdir) / f"{k}_{name}")
        out.append((stage_dir, config))
        previous = (stage_dir, config)
    return out


def finished(stage_dir: str, config: ml_collections.ConfigDict) -> bool:
    try:
        return checkpoint.resolve(stage_dir)[1] >= config.total_steps
    except FileNotFoundError:
        return False


def run(stages: list[tuple[str, ml_collections.ConfigDict]]) -> list[dict]:
    """Trains the stages in order (skipping finished ones); returns the summaries of the stages trained."""
    summaries = []
    for k, (stage_dir, config) in enumerate(stages, 1):
        if finished(stage_dir, config):
            print(f"== stage {k}/{len(stages)}: {stage_dir} is finished (step {config.total_steps})", flush=True)
            continue
        print(f"== stage {k}/{len(stages)}: {stage_dir}"
              + (f" from {config.init_checkpoint} ({config.init_weights})" if config.init_checkpoint else ""),
              flush=True)
        summary = train.train(config, stage_dir)
        summaries.append(summary)
        if summary["step"] < config.total_steps:
            print(f"stage {k} stopped at step {summary['step']} (preempted): re-run the same command to continue",
                  flush=True)
            break
    return summaries


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m varedit_jax.recipe", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", required=True, help="a recipe file (configs/recipe_*.py)")
    parser.add_argument("--workdir", required=True, help="the recipe's folder (local or gs://)")
    parser.add_argument("--distributed", action="store_true", help="jax.distributed.initialize() (TPU pods)")
    parser.add_argument("--coordinator", help="HOST:PORT of an explicit multi-process run")
    parser.add_argument("--num_processes", type=int)
    parser.add_argument("--process_id", type=int)
    args, rest = parser.parse_known_args(argv)
    try:
        stages = stage_configs(configlib.load(args.recipe), args.workdir, configlib.parse_overrides(rest))
        distributed.init_distributed([c for _, c in stages], auto=args.distributed, coordinator=args.coordinator,
                                     num_processes=args.num_processes, process_id=args.process_id)
        run(stages)
    except train.USER_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except train.RUN_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
