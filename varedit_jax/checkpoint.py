"""Orbax checkpoints that carry their own config.

Layout (an orbax CheckpointManager directory):
  ROOT/<step>/params/       the model's parameter tree (nested dict of arrays, `nnx.to_pure_dict` of the Param state)
  ROOT/<step>/config/       the full config as JSON (so every checkpoint can be used with no other flags)
  ROOT/<step>/train_state/  training only: optimizer state, EMA ("ema": the params' tree, or None when the run kept
                            none) and the non-finite counters
  ROOT/<step>/data/         training only: the grain iterator state (one file per process)
  ROOT/<step>/run/          training only: the git commit, process and device counts of the run (`run_info`)
A training workdir keeps its manager under WORKDIR/checkpoints (`TrainCheckpoints`). `resolve` accepts a manager
root, a workdir (newest step) or a step dir, so `convert export`, `edit` and `ablate` take any of the three.
`load` / `load_params` read the parameters or (`weights="ema"`) their EMA, as one tree of the same structure.
Configs stored by older versions are migrated on load (`migrate`: renamed fields and kinds).

Damaged steps (missing or corrupt files, unreadable metadata): readers of a workdir or manager root fall back to the
next older intact step and say which step is broken (`DamagedCheckpoint` when none is left, or when a step dir was
named); training also moves the broken step to WORKDIR/checkpoints_corrupt/<step> (outside the manager's root:
orbax skips saving a step <= its latest, so a broken step left in place would swallow later saves). A step saved
with another model or optimizer (its stored shapes differ) is a `ValueError`, never "damaged".
"""
import functools
import json
import logging
import os
import pathlib
import re
import subprocess
import sys
from typing import Any, Callable

import grain
import jax
import ml_collections
import orbax.checkpoint as ocp
from etils import epath
from jax.experimental import multihost_utils

from varedit_jax import params as params_lib
from varedit_jax import storage

PARAMS, CONFIG, TRAIN_STATE, DATA, RUN = "params", "config", "train_state", "data", "run"
CORRUPT = "checkpoints_corrupt"


class DamagedCheckpoint(ValueError):
    """A checkpoint step that cannot be read, and no older intact one to use."""


class StoredShapeMismatch(ValueError):
    """A step saved with another model / optimizer config: its arrays differ in names or shapes."""


class NoEMA(ValueError):
    """EMA weights were asked for, but the run kept none (`optim.ema_decay` 0, or not a training checkpoint)."""


WEIGHTS = ("params", "ema")  # what `load` reads: the parameters, or their EMA (train_state item)

# Renames since the first checkpoints: (old dotted path, new dotted path); kinds and the stored configs/*.py paths.
RENAMED_FIELDS = (("vae", "image_tokenizer"), ("toy.tokenizer_steps", "toy.image_tokenizer_steps"))
RENAMED_KINDS = {"vae": "image_tokenizer"}
RENAMED_CONFIG_FILES = {"vae_d32.py": "image_tokenizer_d32.py", "vae_d56.py": "image_tokenizer_d56.py",
                        "toy_tokenizer.py": "toy_image_tokenizer.py"}


def migrate(data: dict) -> dict:
    """A stored config (JSON dict) of any earlier version -> today's field names (a new dict)."""
    data = json.loads(json.dumps(data))
    for old, new in RENAMED_FIELDS:
        *parents, leaf = old.split(".")
        node = data
        for name in parents:
            node = node.get(name) if isinstance(node, dict) else None
        if isinstance(node, dict) and leaf in node:
            node[new.split(".")[-1]] = node.pop(leaf)
    if data.get("kind") in RENAMED_KINDS:
        data["kind"] = RENAMED_KINDS[data["kind"]]
    group = data.get("image_tokenizer")
    if isinstance(group, dict) and isinstance(group.get("config"), str):
        path = pathlib.PurePath(group["config"])
        group["config"] = str(path.with_name(RENAMED_CONFIG_FILES.get(path.name, path.name)))
    return data


def _committed(step_dir: epath.Path) -> bool:
    """A finished step: it has its config item, and on gs:// (where orbax writes in place, no rename) its
    `commit_success.txt`."""
    return (step_dir / CONFIG).is_dir() and (not storage.is_remote(step_dir)
                                             or (step_dir / "commit_success.txt").exists())


def candidates(path) -> tuple[epath.Path, list[int], bool]:
    """(manager root, steps newest first, explicit) for a manager root / workdir / step dir, local or gs://
    (explicit: a step dir was named, so there is nothing to fall back to); raises FileNotFoundError if there is
    no step."""
    path = storage.path(path)
    if not path.exists():
        raise FileNotFoundError(f"no checkpoint at {path}")
    if (path / CONFIG).is_dir() and path.name.isdigit():
        return path.parent, [int(path.name)], True
    for root in (path, path / "checkpoints"):
        steps = sorted((int(p.name) for p in root.iterdir() if p.name.isdigit() and _committed(p)),
                       reverse=True) if root.is_dir() else []
        if steps:
            return root, steps, False
    raise FileNotFoundError(f"{path} is not a checkpoint: no step directory with a {CONFIG!r} item "
                            f"(looked in {path} and {path / 'checkpoints'})")


def resolve(path) -> tuple[epath.Path, int]:
    """(manager root, newest step) for a manager root / workdir / step dir; raises if none is found."""
    root, steps, _ = candidates(path)
    return root, steps[0]


def read_error(e: BaseException) -> str:
    """A read error in one line: for TensorStore's (a page-long spec) the array and the directory it failed in."""
    text = str(e).strip()
    paths = re.findall(r"'path': '([^']*)'", text)
    if "TensorStore" in text and paths:
        return f"cannot read array {paths[-1].rstrip('/')!r} in {paths[0]}"
    return (text.splitlines()[0] if text else type(e).__name__)[:300]


def _leaf_shapes(tree) -> dict[str, tuple]:
    """'a/b/0' -> shape for every leaf of a pytree (dicts, sequences, named tuples: the names orbax stores)."""
    name = lambda k: str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k))))  # noqa: E731
    return {"/".join(name(k) for k in path): tuple(leaf.shape)
            for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def check_stored_shapes(item_dir: epath.Path, abstract) -> None:
    """Raises StoredShapeMismatch when the arrays stored at `item_dir` differ in names or shapes from `abstract` (the
    step was saved with another model / optimizer config); a metadata read error propagates (the step is damaged)."""
    _check_shapes(ocp.StandardCheckpointHandler().metadata(item_dir), abstract, item_dir)


def _check_shapes(stored_tree, abstract, where) -> None:
    stored, want = _leaf_shapes(stored_tree), _leaf_shapes(abstract)
    if stored != want:
        diff = sorted(set(stored) ^ set(want)) or [k for k in want if stored[k] != want[k]]
        raise StoredShapeMismatch(f"{where} was saved with another config (first differing arrays: {diff[:5]}); resume "
                         f"with the config that wrote it, or use a new workdir")


def _abandoned(exc) -> bool:
    text = str(exc)
    return "Event loop is closed" in text or "while reading array" in text


class _QuietAbandoned(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not (_abandoned(record.getMessage()) or (record.exc_info and _abandoned(record.exc_info[1])))


def _silence_abandoned_reads() -> None:
    """After a failed restore, orbax's other pending reads of the step fail later, on a closed event loop, and each
    would print its traceback (pages of TensorStore spec); the failure itself is reported once, by the caller."""
    if isinstance(sys.unraisablehook, functools.partial):  # installed already
        return
    sys.unraisablehook = functools.partial(lambda prev, u: None if _abandoned(u.exc_value) else prev(u),
                                           sys.unraisablehook)
    excepthook = sys.excepthook
    sys.excepthook = lambda t, v, tb: None if _abandoned(v) else excepthook(t, v, tb)
    logging.getLogger("asyncio").addFilter(_QuietAbandoned())


def first_intact(path, read: Callable[[epath.Path, int], Any], what: str = "checkpoint") -> tuple[int, Any]:
    """(step, read(root, step)) for the newest step of `path` that reads; each damaged one is reported on stderr
    and skipped (for a named step dir, or when none is left: DamagedCheckpoint). A StoredShapeMismatch or NoEMA
    propagates: only read failures count as damage."""
    root, steps, explicit = candidates(path)
    for i, step in enumerate(steps):
        try:
            return step, read(root, step)
        except (StoredShapeMismatch, NoEMA):
            raise
        except Exception as e:  # noqa: BLE001 - TensorStore / orbax raise bare Exceptions for damaged files
            _silence_abandoned_reads()
            where = f"{what} step {step} ({root / str(step)}) is damaged: {read_error(e)}"
            if explicit or i == len(steps) - 1:
                raise DamagedCheckpoint(where + ("" if explicit else "; no older intact step")) from e
            print(f"warning: {where}; using step {steps[i + 1]}", file=sys.stderr, flush=True)
    raise AssertionError("unreachable")


def config_to_json(config: ml_collections.ConfigDict) -> dict:
    return json.loads(config.to_json_best_effort())


def save_params(directory, params: Any, config: ml_collections.ConfigDict, step: int = 0) -> epath.Path:
    """Writes `params` (a pytree of arrays) and `config` as step `step` of a manager at `directory` (local or
    gs://)."""
    directory = storage.path(directory)
    with ocp.CheckpointManager(directory, item_names=(PARAMS, CONFIG)) as mngr:
        mngr.save(step, args=ocp.args.Composite(**{PARAMS: ocp.args.StandardSave(params),
                                                   CONFIG: ocp.args.JsonSave(config_to_json(config))}))
        mngr.wait_until_finished()
    return directory / str(step)


def load_config(path) -> ml_collections.ConfigDict:
    """The config stored with a checkpoint (any form `resolve` accepts; newest intact step), migrated."""
    def read(root, step):
        with ocp.CheckpointManager(root, item_names=(PARAMS, CONFIG)) as mngr:
            return mngr.restore(step, args=ocp.args.Composite(**{CONFIG: ocp.args.JsonRestore()}))[CONFIG]
    return ml_collections.ConfigDict(migrate(first_intact(path, read)[1]))


def _stored_weights(step_dir: epath.Path, weights: str):
    """(item name, stored metadata tree) of the params, or of the EMA inside the train_state item."""
    if weights == PARAMS:
        return PARAMS, ocp.StandardCheckpointHandler().metadata(step_dir / PARAMS)
    why = "it is not a training checkpoint (no train_state)"
    if (step_dir / TRAIN_STATE).is_dir():
        stored = ocp.StandardCheckpointHandler().metadata(step_dir / TRAIN_STATE)
        ema = getattr(stored, "tree", stored).get("ema")
        if ema is not None:
            return TRAIN_STATE, ema
        why = "the run kept no EMA (optim.ema_decay was 0)"
    raise NoEMA(f"{step_dir}: no EMA weights: {why}; use the params (--weights params)")


def load(path, abstract_params: Any = None, *,
         weights: str = "params") -> tuple[int, ml_collections.ConfigDict, Any]:
    """(step, config, weights) of a checkpoint's newest intact step. weights "params": the parameters; "ema": the
    EMA of them that training kept (same tree; NoEMA when the run kept none). `abstract_params` (a tree of
    jax.ShapeDtypeStruct, optionally with shardings) restores directly into that structure/placement; without it the
    stored arrays come back on this process's first device (whatever topology saved them, so any process can load
    them)."""
    if weights not in WEIGHTS:
        raise ValueError(f"weights must be one of {WEIGHTS}, got {weights!r}")

    def read(root, step):
        item, stored = _stored_weights(root / str(step), weights)
        if abstract_params is None:
            local = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
            abstract = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=local), stored)
        else:
            _check_shapes(stored, abstract_params, root / str(step) / item)
            abstract = abstract_params
        if item == PARAMS:
            restore = ocp.args.StandardRestore(abstract)
        else:  # only the "ema" subtree of the train_state item
            restore = ocp.args.PyTreeRestore(item={"ema": abstract}, partial_restore=True, restore_args={
                "ema": jax.tree.map(lambda a: ocp.ArrayRestoreArgs(sharding=a.sharding), abstract)})
        with ocp.CheckpointManager(root, item_names=(item, CONFIG)) as mngr:
            out = mngr.restore(step, args=ocp.args.Composite(**{item: restore, CONFIG: ocp.args.JsonRestore()}))
        return out[CONFIG], out[item] if item == PARAMS else out[item]["ema"]
    step, (config, tree) = first_intact(path, read)
    return step, ml_collections.ConfigDict(migrate(config)), tree


def load_params(path, abstract_params: Any = None, *,
                weights: str = "params") -> tuple[ml_collections.ConfigDict, Any]:
    """(config, params) of a checkpoint (newest intact step): `load` without the step. weights "ema": the EMA the
    run kept, in place of the params."""
    _, config, tree = load(path, abstract_params, weights=weights)
    return config, tree


def git_commit() -> str:
    """The commit of the code that is running: $VAREDIT_GIT_COMMIT if set; in a `git archive` (what the TPU
    launcher ships) the commit git wrote into varedit_jax/COMMIT (export-subst); in a checkout `git rev-parse HEAD`
    (+ "-dirty" with uncommitted changes); else "unknown"."""
    if os.environ.get("VAREDIT_GIT_COMMIT"):
        return os.environ["VAREDIT_GIT_COMMIT"]
    shipped = (pathlib.Path(__file__).parent / "COMMIT").read_text().strip()
    if re.fullmatch(r"[0-9a-f]{40}", shipped):
        return shipped
    repo = pathlib.Path(__file__).resolve().parent.parent
    try:
        head = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True,
                              timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return head + ("-dirty" if dirty else "")


def run_info() -> dict:
    """What a training checkpoint records about the run that wrote it (its `run` item)."""
    return {"git_commit": git_commit(), "process_count": jax.process_count(), "device_count": jax.device_count(),
            "jax_version": jax.__version__}


def stored_data_states(data_dir: epath.Path) -> dict[int, dict]:
    """process index -> the grain iterator state each process of the run that wrote `data_dir` saved."""
    found = {}
    for f in data_dir.glob("process_*-of-*.json"):
        m = re.fullmatch(r"process_(\d+)-of-(\d+)\.json", f.name)
        if m:
            found[int(m.group(1))] = (int(m.group(2)), json.loads(f.read_text()))
    counts = {n for n, _ in found.values()}
    if len(counts) != 1 or len(found) != next(iter(counts)):
        raise ValueError(f"{data_dir}: incomplete data iterator states {sorted(f.name for f in data_dir.iterdir())}")
    return {i: state for i, (_, state) in found.items()}


def _partial_item(stored, target: dict, prefix: str = "") -> tuple[Any, list[str]]:
    """The part of the stored tree (metadata) that `target` ({"a/b": ShapeDtypeStruct}) has with the same shape, in
    the stored tree's structure (a list is kept or left out whole), and the stored names left out."""
    if isinstance(stored, dict):
        out, dropped = {}, []
        for k, v in stored.items():
            sub, d = _partial_item(v, target, f"{prefix}{k}/")
            dropped += d
            if sub is not None:
                out[k] = sub
        return (out or None), dropped
    if isinstance(stored, (list, tuple)):
        parts = [_partial_item(v, target, f"{prefix}{i}/") for i, v in enumerate(stored)]
        dropped = [n for _, d in parts for n in d]
        return (None if dropped else [sub for sub, _ in parts]), dropped or []
    name = prefix[:-1]
    want = target.get(name)
    if want is None or tuple(want.shape) != tuple(stored.shape):
        return None, [name]
    return want, []


def load_matching(path, target: dict, weights: str = "params") -> tuple[ml_collections.ConfigDict, dict, list[str]]:
    """(stored config, {"a/b": array}, names left out) of the newest intact step of a checkpoint: the arrays named
    in `target` ({"a/b": ShapeDtypeStruct with a sharding}) that the checkpoint holds with the same shape,
    restored straight into their shardings (nothing else is read). weights "params", or "ema" (the EMA a training
    checkpoint kept; NoEMA when it kept none)."""
    if weights not in WEIGHTS:
        raise ValueError(f"weights must be one of {WEIGHTS}, got {weights!r}")

    def read(root, step):
        item, stored = _stored_weights(root / str(step), weights)
        stored = getattr(stored, "tree", stored)
        if item == TRAIN_STATE:  # the "ema" subtree of the train_state item
            stored, target_in = {"ema": stored}, {f"ema/{k}": v for k, v in target.items()}
        else:
            target_in = target
        partial, dropped = _partial_item(stored, target_in)
        restored = {}
        if partial is not None:
            restored = ocp.PyTreeCheckpointer().restore(root / str(step) / item, args=ocp.args.PyTreeRestore(
                item=partial, restore_args=ocp.checkpoint_utils.construct_restore_args(partial),
                partial_restore=True))
            restored = restored["ema"] if item == TRAIN_STATE else restored
        with ocp.CheckpointManager(root, item_names=(PARAMS, CONFIG)) as mngr:
            config = mngr.restore(step, args=ocp.args.Composite(**{CONFIG: ocp.args.JsonRestore()}))[CONFIG]
        return ml_collections.ConfigDict(migrate(config)), params_lib.flat_leaves(restored), dropped
    return first_intact(path, read)[1]


class TrainCheckpoints:
    """The async checkpoint manager of a training workdir (WORKDIR/checkpoints, local or gs://): params,
    train_state (everything else the step changes, a dict), data (the grain iterator, one file per process), config
    and run (`run_info`) per step; keeps the newest `keep`, and every `keep_period`-th step (0: none) beside them."""

    def __init__(self, workdir: epath.Path, keep: int, keep_period: int = 0):
        handlers = {PARAMS: ocp.StandardCheckpointHandler(), TRAIN_STATE: ocp.StandardCheckpointHandler(),
                    DATA: grain.checkpoint.CheckpointHandler(), CONFIG: ocp.JsonCheckpointHandler(),
                    RUN: ocp.JsonCheckpointHandler()}
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, keep_period=keep_period or None,
                                               enable_async_checkpointing=True, create=True)
        self.manager = ocp.CheckpointManager(storage.path(workdir) / "checkpoints", options=options,
                                             item_handlers=handlers)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, params, train_state: dict, iterator, config: ml_collections.ConfigDict, *,
             wait: bool = False) -> None:
        self.manager.save(step, args=ocp.args.Composite(**{
            PARAMS: ocp.args.StandardSave(params), TRAIN_STATE: ocp.args.StandardSave(train_state),
            DATA: grain.checkpoint.CheckpointSave(iterator), CONFIG: ocp.args.JsonSave(config_to_json(config)),
            RUN: ocp.args.JsonSave(run_info())}), force=True)
        if wait:
            self.manager.wait_until_finished()

    def restore_latest(self, abstract_params, abstract_train_state: dict, iterator
                       ) -> tuple[int, Any, dict, dict | None] | None:
        """(step, params, train_state, data states) of the newest intact step, or None when the workdir has none.
        When the step was saved by as many processes as run now, `iterator` is restored in place and data states
        is None; otherwise it is {process index: iterator state} of the saving run (the caller re-splits it).
        Each damaged step is reported and moved to WORKDIR/checkpoints_corrupt/<step>."""
        for step in sorted(self.manager.all_steps(), reverse=True):
            item = self.manager.directory / str(step)
            try:
                check_stored_shapes(item / PARAMS, abstract_params)
                check_stored_shapes(item / TRAIN_STATE, abstract_train_state)
                states = stored_data_states(item / DATA)
                items = {PARAMS: ocp.args.StandardRestore(abstract_params),
                         TRAIN_STATE: ocp.args.StandardRestore(abstract_train_state)}
                if len(states) == jax.process_count():
                    items[DATA], states = grain.checkpoint.CheckpointRestore(iterator), None
                out = self.manager.restore(step, args=ocp.args.Composite(**items))
                self._note_code_change(item)
                return step, out[PARAMS], out[TRAIN_STATE], states
            except StoredShapeMismatch:
                raise
            except Exception as e:  # noqa: BLE001 - TensorStore / orbax raise bare Exceptions for damaged files
                _silence_abandoned_reads()
                self._quarantine(step, read_error(e))
        return None

    def _note_code_change(self, step_dir: epath.Path) -> None:
        if (step_dir / RUN).is_dir() and jax.process_index() == 0:
            stored = self.manager.restore(int(step_dir.name), args=ocp.args.Composite(
                **{RUN: ocp.args.JsonRestore()}))[RUN]
            if stored.get("git_commit") != git_commit():
                print(f"note: step {step_dir.name} was written by commit {stored.get('git_commit')}; resuming with "
                      f"{git_commit()}", flush=True)

    def _quarantine(self, step: int, why: str) -> None:
        """Moves a damaged step out of the manager's root (process 0) and reloads the manager everywhere."""
        src = storage.path(self.manager.directory) / str(step)
        dst = src.parent.parent / CORRUPT / str(step)
        if jax.process_index() == 0:
            storage.makedirs(dst.parent)
            storage.remove_tree(dst)
            src.rename(dst)  # on gs:// a copy + delete of every object of the step
            print(f"warning: checkpoint step {step} ({src}) is damaged: {why}; moved to {dst}, trying the previous "
                  f"step", file=sys.stderr, flush=True)
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices(f"quarantine checkpoint {step}")
        self.manager.reload()

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()
