"""Orbax checkpoints that carry their own config.

Layout (an orbax CheckpointManager directory):
  ROOT/<step>/params/   the model's parameter tree (nested dict of arrays, `nnx.to_pure_dict` of the Param state)
  ROOT/<step>/config/   the full config as JSON (so every checkpoint can be used with no other flags)
  ROOT/<step>/...       training adds more items (optimizer state, data iterator, metadata)
A training workdir keeps its manager under WORKDIR/checkpoints. `resolve` accepts a manager root, a workdir
(newest step) or a step dir, so `convert export`, `edit` and `ablate` take any of the three.
"""
import json
import pathlib
from typing import Any

import jax
import ml_collections
import orbax.checkpoint as ocp

PARAMS, CONFIG = "params", "config"


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
    """The config stored with a checkpoint (any form `resolve` accepts)."""
    root, step = resolve(path)
    with ocp.CheckpointManager(root, item_names=(PARAMS, CONFIG)) as mngr:
        data = mngr.restore(step, args=ocp.args.Composite(**{CONFIG: ocp.args.JsonRestore()}))[CONFIG]
    return ml_collections.ConfigDict(data)


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
    return ml_collections.ConfigDict(out[CONFIG]), out[PARAMS]
