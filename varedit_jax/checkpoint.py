"""Orbax checkpoints that carry their own config.

Layout (an orbax CheckpointManager directory):
  ROOT/<step>/params/       the model's parameter tree (nested dict of arrays, `nnx.to_pure_dict` of the Param state)
  ROOT/<step>/config/       the full config as JSON (so every checkpoint can be used with no other flags)
  ROOT/<step>/train_state/  training only: optimizer state, EMA and the non-finite counters
  ROOT/<step>/data/         training only: the grain iterator state (one file per process)
A training workdir keeps its manager under WORKDIR/checkpoints (`TrainCheckpoints`). `resolve` accepts a manager
root, a workdir (newest step) or a step dir, so `convert export`, `edit` and `ablate` take any of the three.
Configs stored by older versions are migrated on load (`migrate`: renamed fields and kinds).
"""
import json
import pathlib
from typing import Any

import grain
import jax
import ml_collections
import orbax.checkpoint as ocp

PARAMS, CONFIG, TRAIN_STATE, DATA = "params", "config", "train_state", "data"

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


def resolve(path: str | pathlib.Path) -> tuple[pathlib.Path, int]:
    """(manager root, step) for a manager root / workdir (newest step) / step dir; raises if none is found."""
    path = pathlib.Path(path).expanduser().resolve()
    if not path.exists():
        raise FileNotFoundError(f"no checkpoint at {path}")
    if (path / CONFIG).is_dir() and path.name.isdigit():
        return path.parent, int(path.name)
    for root in (path, path / "checkpoints"):
        steps = sorted(int(p.name) for p in root.iterdir() if p.name.isdigit() and (p / CONFIG).is_dir()) \
            if root.is_dir() else []
        if steps:
            return root, steps[-1]
    raise FileNotFoundError(f"{path} is not a checkpoint: no step directory with a {CONFIG!r} item "
                            f"(looked in {path} and {path / 'checkpoints'})")


def config_to_json(config: ml_collections.ConfigDict) -> dict:
    return json.loads(config.to_json_best_effort())


def save_params(directory: str | pathlib.Path, params: Any, config: ml_collections.ConfigDict,
                step: int = 0) -> pathlib.Path:
    """Writes `params` (a pytree of arrays) and `config` as step `step` of a manager at `directory`."""
    directory = pathlib.Path(directory).expanduser().resolve()
    with ocp.CheckpointManager(directory, item_names=(PARAMS, CONFIG)) as mngr:
        mngr.save(step, args=ocp.args.Composite(**{PARAMS: ocp.args.StandardSave(params),
                                                   CONFIG: ocp.args.JsonSave(config_to_json(config))}))
        mngr.wait_until_finished()
    return directory / str(step)


def load_config(path: str | pathlib.Path) -> ml_collections.ConfigDict:
    """The config stored with a checkpoint (any form `resolve` accepts), migrated to today's names."""
    root, step = resolve(path)
    with ocp.CheckpointManager(root, item_names=(PARAMS, CONFIG)) as mngr:
        data = mngr.restore(step, args=ocp.args.Composite(**{CONFIG: ocp.args.JsonRestore()}))[CONFIG]
    return ml_collections.ConfigDict(migrate(data))


def load_params(path: str | pathlib.Path, abstract_params: Any = None) -> tuple[ml_collections.ConfigDict, Any]:
    """(config, params) of a checkpoint. `abstract_params` (a tree of jax.ShapeDtypeStruct, optionally with
    shardings) restores directly into that structure/placement; without it the stored arrays come back on this
    process's first device (whatever topology saved them, so any process of a multi-process run can load them)."""
    root, step = resolve(path)
    if abstract_params is None:
        local = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        stored = ocp.StandardCheckpointHandler().metadata(root / str(step) / PARAMS)
        abstract_params = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=local), stored)
    restore = ocp.args.StandardRestore(abstract_params)
    with ocp.CheckpointManager(root, item_names=(PARAMS, CONFIG)) as mngr:
        out = mngr.restore(step, args=ocp.args.Composite(**{PARAMS: restore, CONFIG: ocp.args.JsonRestore()}))
    return ml_collections.ConfigDict(migrate(out[CONFIG])), out[PARAMS]


class TrainCheckpoints:
    """The async checkpoint manager of a training workdir (WORKDIR/checkpoints): params, train_state (everything
    else the step changes, a dict), data (the grain iterator) and config per step; keeps the newest `keep`."""

    def __init__(self, workdir: pathlib.Path, keep: int):
        handlers = {PARAMS: ocp.StandardCheckpointHandler(), TRAIN_STATE: ocp.StandardCheckpointHandler(),
                    DATA: grain.checkpoint.CheckpointHandler(), CONFIG: ocp.JsonCheckpointHandler()}
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=True, create=True)
        self.manager = ocp.CheckpointManager(workdir / "checkpoints", options=options, item_handlers=handlers)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, params, train_state: dict, iterator, config: ml_collections.ConfigDict, *,
             wait: bool = False) -> None:
        self.manager.save(step, args=ocp.args.Composite(**{
            PARAMS: ocp.args.StandardSave(params), TRAIN_STATE: ocp.args.StandardSave(train_state),
            DATA: grain.checkpoint.CheckpointSave(iterator), CONFIG: ocp.args.JsonSave(config_to_json(config))}),
            force=True)
        if wait:
            self.manager.wait_until_finished()

    def restore(self, step: int, abstract_params, abstract_train_state: dict, iterator) -> tuple[Any, dict]:
        """(params, train_state) restored into the abstract trees' shardings; `iterator` is set in place."""
        out = self.manager.restore(step, args=ocp.args.Composite(**{
            PARAMS: ocp.args.StandardRestore(abstract_params),
            TRAIN_STATE: ocp.args.StandardRestore(abstract_train_state),
            DATA: grain.checkpoint.CheckpointRestore(iterator)}))
        return out[PARAMS], out[TRAIN_STATE]

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()
