"""Training VAREdit (and Infinity) transformers: one pure jitted train step over a (dcn, data, fsdp, tensor) mesh.

  python -m varedit_jax.train --config configs/varedit_tiny.py --workdir runs/tiny [--config.total_steps=200]

Re-running the same command resumes from the newest checkpoint in the workdir. Multi-host (TPU pods): add
`--distributed` (every host runs the same command; `jax.distributed.initialize()` finds the coordinator), or
`--coordinator HOST:PORT --num_processes N --process_id I` explicitly (also how the tests run 2 local processes).
The config's fields: `varedit_jax.train_config`.

The step: `varedit_jax.train_step` (pure), jitted by `varedit_jax.trainer.Trainer` once per aspect template, state
donated; this module is the loop around it (data, checkpoints, metrics, samples, preemption) and the CLI.

Workdir:
  checkpoints/<step>/  params, train_state (optimizer state, EMA, counters), data (grain iterator state, one file per
                       process), config (`checkpoint.TrainCheckpoints`) - `edit`, `convert export` and `ablate` take
                       the workdir, the checkpoints dir or a step dir.
  metrics.jsonl, tb/   see `varedit_jax.metrics`;   curves.png   loss / bit-accuracy curves (written at the end)
  samples/step_<n>.png sample edits of held-out pairs;  toy_scores.{md,csv,json}   `toy_eval_pairs` held-out toy pairs
                       edited and scored at the end (success / preservation / balance, copy-source and oracle beside)
Preemption: SIGTERM (and SIGINT) finish the current step, save a checkpoint and return (under jax.distributed through
JAX's preemption service: every process stops at the same step, `distributed.Preemption`). A hung step ends the
process with exit code 75 after logging every thread's stack (`watchdog`). The workdir may be on gs://
(`varedit_jax.storage`; metrics and TensorBoard files are uploaded at every checkpoint and at exit).
"""
import dataclasses
import itertools
import json
import math
import os
import statistics
import sys
import time
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import app, flags, logging
from etils import epath
from flax import nnx
from ml_collections import config_flags

from data_pipelines import records
from varedit_jax import (assets, checkpoint, configlib, data, distributed, editor, images, loading, metrics, run_lock,
                         sampler, storage, text, toy_eval, train_config, watchdog)
from varedit_jax.eval import report
from varedit_jax.train_step import TrainState, sequence_layout
from varedit_jax.trainer import Trainer, make_mesh


# ------------------------------------------------------------------------------------------------ the loop
def host_batch(local: dict, text_cache: text.FeatureCache | None) -> tuple[dict, np.ndarray]:
    """The numeric fields of a local batch the step takes (text features from the cache when on) + the record ids."""
    out = {k: local[k] for k in ("source", "target", "text_mask")}
    if text_cache is None:
        out["text_ids"] = local["text_ids"]
    else:
        out["text_feats"] = text_cache(local["instruction"], local["text_ids"], local["text_mask"])
    return out, local["id"]


class Profile:
    """The jax.profiler window of `config.profile`: traces under WORKDIR/profile (on gs:// traced locally and
    uploaded when the window ends)."""

    def __init__(self, window: ml_collections.ConfigDict, workdir: epath.Path):
        self.window = window
        self.dir = storage.Mirror(workdir / "profile") if window.start_step >= 0 else None

    def before(self, step: int) -> None:
        if self.dir is not None and step == self.window.start_step:
            jax.profiler.start_trace(str(self.dir.local))

    def after(self, step: int) -> None:
        if self.dir is not None and step == self.window.start_step + self.window.num_steps:
            jax.profiler.stop_trace()
            self.dir.push()


@dataclasses.dataclass
class Run:
    """One training call: the trainer, its frozen models and data, the checkpoints and metric sinks."""
    config: ml_collections.ConfigDict
    workdir: epath.Path
    trainer: Trainer
    frozen_states: tuple
    models: tuple                          # (image tokenizer, text encoder, text tokenizer) on the host
    text_cache: text.FeatureCache | None
    iterator: Any
    checkpoints: checkpoint.TrainCheckpoints
    writer: metrics.Writer
    peak_flops: float
    profile: Profile
    watchdog: watchdog.Watchdog
    records_read: int = 0                  # in this call, all processes (replaced records included)
    replaced: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(len(data.CAUSES), np.int64))

    def tokenize(self, texts, n):
        return self.models[2](list(texts), n)

    def host_batch(self, local: dict) -> tuple[dict, np.ndarray]:
        return host_batch(local, self.text_cache)

    def save(self, state: TrainState, *, wait: bool = False) -> None:
        """Checkpoints the state, then publishes the metrics written so far (gs:// workdirs)."""
        self.checkpoints.save(int(jax.device_get(state.step)), state.params, state.rest(), self.iterator,
                              self.config, wait=wait)
        self.writer.push()


def _open_run(config: ml_collections.ConfigDict, workdir: epath.Path) -> tuple[Run, TrainState]:
    """Builds everything a run needs and restores (or initialises) the state."""
    mesh = make_mesh(config)
    image_tok, text_encoder, text_tokenizer = loading.load_frozen(config)
    config.data.stride = config.eval_data.stride = image_tok.stride
    trainer = Trainer(config, mesh, image_tok, text_encoder)
    tok = lambda texts, n: text_tokenizer(list(texts), n)  # noqa: E731
    iterator = iter(data.make_dataset(config.data, seed=config.seed, batch_size=config.batch_size, tokenizer=tok))
    checkpoints = checkpoint.TrainCheckpoints(workdir, config.keep_checkpoints, config.keep_period)
    state = trainer.restore_state(checkpoints, iterator)
    if state is not None:
        print(f"resumed {workdir} at step {int(jax.device_get(state.step))}", flush=True)
    else:
        state = trainer.init_state(loading.load_init_params(config, trainer.init_params_fn()()))
    trainer.check_sharding(state)
    start = int(jax.device_get(state.step))
    run = Run(config, workdir, trainer, trainer.place_frozen(image_tok, text_encoder),
              (image_tok, text_encoder, text_tokenizer),
              text.FeatureCache(text_encoder) if config.text.cache else None, iterator, checkpoints,
              metrics.Writer(workdir, config.total_steps, start, enabled=jax.process_index() == 0),
              metrics.peak_flops(), Profile(config.profile, workdir), watchdog.Watchdog(config.watchdog))
    return run, state


def _run_step(run: Run, state: TrainState, step: int, compiled: dict) -> tuple[TrainState, dict]:
    """One step of the loop (compiling the template's step on first use); returns the new state and its metrics."""
    config = run.config
    template = data.template_for_step(config.seed, step, tuple(config.data.templates))
    local = next(run.iterator)
    host, ids = run.host_batch(local)
    replaced = data.replaced_counts(local)
    batch = data.global_batch(host, run.trainer.batch_sharding)
    with jax.set_mesh(run.trainer.mesh):  # the mesh context the Pallas kernels need; the shardings are explicit
        if template not in compiled:
            t0 = time.perf_counter()
            compiled[template] = run.trainer.step_fn(template).lower(state, run.frozen_states, batch).compile()
            run.writer.log(f"compiled the step of template {template} in {time.perf_counter() - t0:.1f} s")
            run.watchdog.begin(step + 1)  # a compile is no hang: the step's clock starts now
        run.profile.before(step)
        t0 = time.perf_counter()
        state, out = compiled[template](state, run.frozen_states, batch)
    out = jax.device_get(out)
    dt = time.perf_counter() - t0
    layout = sequence_layout(config, template)
    row = {k: float(v) for k, v in out.items() if k != "finite"}
    row.update(finite=bool(out["finite"]), step_time_s=dt, data_digest=data.batch_digest(ids),
               tokens_per_s_per_device=config.batch_size * layout.length / dt / jax.device_count(),
               **{"data/replaced": int(replaced.sum())},
               **{f"data/replaced_{cause}": int(n) for cause, n in zip(data.CAUSES, replaced)})
    run.records_read += config.batch_size + int(replaced.sum())
    run.replaced += replaced
    if not math.isnan(run.peak_flops):  # model FLOPs: forward + backward of every sample, per device
        row["mfu"] = (config.batch_size * 3 * metrics.transformer_flops(config.model, layout, config.text.max_len)
                      / jax.device_count() / dt / run.peak_flops)
    return state, row


def _after_step(run: Run, state: TrainState, step: int, row: dict) -> None:
    """Logging, the non-finite stop, periodic validation / samples / checkpoints after step `step`."""
    config = run.config
    if step % config.log_every == 0 or step == config.total_steps or not row["finite"]:
        run.writer.write(step, "train", {k: v for k, v in row.items() if k != "finite"})
    try:
        data.check_bad_fraction(run.records_read, int(run.replaced.sum()), config.data.max_bad_fraction)
    except data.TooMuchBadData:
        run.save(state, wait=True)
        raise
    if not row["finite"]:
        run.writer.log(f"step {step}: non-finite loss or gradients, step skipped ({int(row['skipped'])} so far)")
        if int(jax.device_get(state.bad_steps)) >= config.max_nonfinite_steps:
            run.save(state, wait=True)
            raise FloatingPointError(
                f"{config.max_nonfinite_steps} non-finite steps in a row at step {step}: stopped (checkpoint saved "
                f"at step {step} with the last finite parameters; lower optim.lr or check the data)")
    if config.eval_every > 0 and step % config.eval_every == 0:
        run.writer.write(step, "val", evaluate(run, state.params))
    if config.sample_every > 0 and step % config.sample_every == 0:
        sample_grid(run, state.params, run.workdir / "samples" / f"step_{step}.png")
    if step % config.checkpoint_every == 0 or step == config.total_steps:
        run.save(state)
    run.profile.after(step)


def train(config: ml_collections.ConfigDict, workdir) -> dict:
    """Trains to `config.total_steps`, resuming from the newest checkpoint in `workdir`; returns a summary:
    {"step", "final_loss", "step_time_s" (median, compile excluded), "tokens_per_s_per_device", "mfu", "workdir",
    "checkpoint", "skipped"}."""
    workdir = storage.path(workdir)
    train_config.validate(config)
    for bucket_path in {storage.bucket_of(p): p for p in train_config.paths(config) + [workdir]
                        if storage.is_remote(p)}.values():
        storage.check_reachable(bucket_path)
    storage.makedirs(workdir)
    with run_lock.hold(workdir):  # a workdir in use is refused before anything is built
        config = assets.resolve(config)  # under jax.distributed, `main` has built them already (build_in_child)
        if config.compilation_cache:
            jax.config.update("jax_compilation_cache_dir",
                              os.fspath(storage.path(config.compilation_cache_dir or assets.cache_dir() / "xla")))
        return _train(config, workdir)


def _train(config: ml_collections.ConfigDict, workdir: epath.Path) -> dict:
    run, state = _open_run(config, workdir)
    start = step = int(jax.device_get(state.step))
    if jax.process_index() == 0:
        n_params = sum(int(np.prod(np.shape(x))) for x in jax.tree.leaves(state.params))
        print(f"{config.kind} {config.conditioning}: {n_params:,} parameters, mesh {dict(run.trainer.mesh.shape)}, "
              f"global batch {config.batch_size}, steps {start}..{config.total_steps}, workdir {workdir}", flush=True)
        for problem in loading.serving_problems(config):
            print(f"warning: {problem}; `convert export` will refuse this model (--force exports it anyway)",
                  file=sys.stderr, flush=True)
    rows, compiled = [], {}
    try:
        with distributed.Preemption() as preempt, run.watchdog:
            while step < config.total_steps:
                run.watchdog.begin(step + 1)
                state, row = _run_step(run, state, step, compiled)
                step += 1
                run.watchdog.end(step)
                run.writer.advance()
                rows.append(row)
                _after_step(run, state, step, row)
                if preempt.reached(step):
                    if run.checkpoints.latest_step() != step:
                        run.save(state, wait=True)
                    run.checkpoints.wait()
                    run.writer.log(f"preempted: checkpoint saved at step {step}; re-run the same command to resume")
                    break
            run.checkpoints.wait()
            if step >= config.total_steps > start and not preempt.requested:
                if config.eval_every >= 0:
                    run.writer.write(step, "val", evaluate(run, state.params))
                if config.sample_every >= 0:
                    path = sample_grid(run, state.params, workdir / "samples" / f"step_{step}.png")
                    run.writer.log(f"sample edits: {path}")
                if config.toy_eval_pairs > 0:
                    run.writer.log(toy_scores(run, state.params, step))
    finally:
        run.writer.close()
        run.checkpoints.close()
    if jax.process_index() == 0 and rows:
        curves = metrics.save_curves({config.conditioning: workdir / "metrics.jsonl"}, workdir / "curves.png",
                                     title=f"{config.kind} {config.conditioning}: {workdir}")
        print(f"learning curves: {curves}", flush=True)
    return _summary(run, state, step, rows)


def _summary(run: Run, state: TrainState, step: int, rows: list[dict]) -> dict:
    timed = rows[1:]  # the first step of a call waits for its compile's aftermath
    stored = run.workdir / "summary.json"
    if not timed and stored.is_file():  # nothing trained in this call: the run's own summary stands
        return json.loads(stored.read_text())
    median = lambda key: statistics.median(r[key] for r in timed) if timed and key in timed[0] else None  # noqa
    summary = {"step": step, "final_loss": rows[-1]["loss"] if rows else None,
               "skipped": int(jax.device_get(state.skipped)), "step_time_s": median("step_time_s"),
               "workdir": str(run.workdir), "tokens_per_s_per_device": median("tokens_per_s_per_device"),
               "mfu": median("mfu"), "checkpoint": str(run.workdir / "checkpoints" / str(step)),
               "records_read": run.records_read, "data_replaced": dict(zip(data.CAUSES, run.replaced.tolist()))}
    if jax.process_index() == 0:
        storage.write_text(stored, json.dumps(summary, indent=1) + "\n")
        print(json.dumps(summary), flush=True)
    return summary


def evaluate(run: Run, params) -> dict:
    """Mean validation metrics over `eval_batches` batches of `eval_data` (no flips, no text dropout)."""
    config = run.config
    ds = data.make_dataset(config.eval_data, seed=config.seed, batch_size=config.batch_size, tokenizer=run.tokenize)
    sums, n = {}, 0
    for local, _ in zip(ds, range(config.eval_batches)):
        template = data.template_for_step(config.seed, n, tuple(config.eval_data.templates))
        host, _ = run.host_batch(local)
        with jax.set_mesh(run.trainer.mesh):
            out = run.trainer.eval_fn(template)(params, run.frozen_states,
                                                data.global_batch(host, run.trainer.batch_sharding))
        out = jax.device_get(out)
        sums = {k: sums.get(k, 0.0) + float(v) for k, v in out.items()}
        n += 1
    return {k: v / max(n, 1) for k, v in sums.items()}


def _editor(run: Run, params) -> editor.Editor:
    """An Editor of the current params in their training shardings (no gathered copy)."""
    graphdefs = (run.trainer.frozen.image_tokenizer, run.trainer.frozen.text_encoder)
    frozen = (nnx.merge(g, s) for g, s in zip(graphdefs, run.frozen_states))
    return editor.Editor(run.config, params, *frozen, run.models[2], mesh=run.trainer.mesh, rules=run.config.mesh.rules)


def sample_grid(run: Run, params, path: epath.Path) -> epath.Path:
    """Edits the first `sample_count` held-out pairs with the current params; writes source | instruction | output |
    target rows to `path`. Collective: every process edits (the sampler spans all devices), process 0 writes."""
    config = run.config
    edit = _editor(run, params)
    pairs = list(itertools.islice(records.iter_records(config.eval_data.paths), config.sample_count))
    sources = [images.decode(p["source"]) for p in pairs]
    outputs = edit.edit(sources, [p["instruction"] for p in pairs], preprocess="train")
    if jax.process_index() != 0:
        return path
    return report.save_grid(path, sources, [p["instruction"] for p in pairs], outputs,
                            targets=[images.decode(p["target"]) for p in pairs])


def toy_scores(run: Run, params, step: int) -> str:
    """Edits the first `toy_eval_pairs` held-out pairs (or all, if fewer; default sampling) and scores them
    (`toy_eval`) beside the copy-source and oracle rows; writes WORKDIR/toy_scores.{md,csv,json} and returns the
    table (markdown). Collective: every process edits, process 0 writes."""
    config = run.config
    pairs = toy_eval.eval_pairs(config.eval_data.paths, config.toy_eval_pairs, allow_fewer=True)
    row, _ = toy_eval.edit_and_score(_editor(run, params), pairs, sampler.SamplingOptions(seed=config.seed))
    image_tok = nnx.merge(run.trainer.frozen.image_tokenizer, run.frozen_states[0])
    rows = [dict(conditioning=f"{config.conditioning} (this run)", **row),
            *toy_eval.reference_rows(image_tok, config.pn, pairs)]
    if jax.process_index() != 0:
        return ""
    paths = report.write_table(rows, run.workdir, "toy_scores", columns=["conditioning", *toy_eval.COLUMNS, "n"],
                               title=f"Toy edits at step {step}: {row['n']} held-out pairs, scores on 0-10")
    return paths["md"].read_text()


# ------------------------------------------------------------------------------------------------ CLI
USER_ERRORS = (ValueError, FileNotFoundError, KeyError, run_lock.WorkdirLocked, storage.StorageError)  # exit 2
RUN_ERRORS = (FloatingPointError, data.TooMuchBadData)  # the run stopped itself (saved first): exit 1


def main(argv, config: ml_collections.ConfigDict | None, workdir: str | None, **options) -> int:
    """The CLI: `options` = `distributed.init_distributed`'s keywords (auto, coordinator, num_processes, process_id)."""
    logging.set_verbosity(logging.WARNING)
    if len(argv) > 1:
        print(f"error: unexpected arguments {argv[1:]}", file=sys.stderr)
        return 2
    if config is None or not workdir:
        print("error: --config and --workdir are required", file=sys.stderr)
        return 2
    try:
        distributed.init_distributed([config], **options)
        train(config, workdir)
    except USER_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except RUN_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":  # flags are defined here only, so importing this module defines none
    _CONFIG = config_flags.DEFINE_config_file("config", None, "training config (configs/*.py[:arg])", lock_config=False)
    _WORKDIR = flags.DEFINE_string("workdir", None, "output / resume directory")
    _DISTRIBUTED = flags.DEFINE_bool("distributed", False, "call jax.distributed.initialize() (TPU pods, clusters)")
    _COORDINATOR = flags.DEFINE_string("coordinator", None, "coordinator HOST:PORT for an explicit multi-process run")
    _NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "processes of an explicit multi-process run")
    _PROCESS_ID = flags.DEFINE_integer("process_id", None, "this process's index in an explicit multi-process run")
    app.run(lambda argv: sys.exit(main(argv, _CONFIG.value, _WORKDIR.value, auto=_DISTRIBUTED.value,
                                       coordinator=_COORDINATOR.value, num_processes=_NUM_PROCESSES.value,
                                       process_id=_PROCESS_ID.value)), flags_parser=configlib.parse_flags)
