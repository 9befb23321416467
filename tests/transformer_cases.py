"""Shared helpers of the transformer tests: fixture models and inputs (read from each fixture folder's own files).

Fixture layouts are converted here: latents NCHW -> NHWC, packed text (kv_compact, lens) -> padded + mask.
"""
import functools
import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from varedit_jax import conditioning, schedules, transformer
from varedit_jax.convert import infinity as convert_infinity

KIND_OF_FOLDER = {"infinity_transformer": "infinity", "varedit_transformer": "varedit"}


def kind_of(folder: pathlib.Path) -> str:
    """infinity for text-to-image fixtures, varedit for editing ones (by the folder's README contract)."""
    return KIND_OF_FOLDER[folder.name]


@functools.lru_cache(maxsize=None)
def load_model(weights: str, kind: str, scan_layers: bool = True, dtype: str = "float32"):
    """(config, model) imported from an official weights file, without any config (all from the weights)."""
    config, params = convert_infinity.import_weights(weights, kind=kind)
    overrides = dict(config.model.items(), scan_layers=scan_layers, dtype=dtype)
    if not scan_layers:
        params = dict(params, blocks={b: {k: _index(v, b) for k, v in params["blocks"].items()}
                                      for b in range(config.model.depth)})
    return config, transformer.build(transformer.default_model_config(**overrides), params)


def _index(tree, b):
    return {k: _index(v, b) for k, v in tree.items()} if isinstance(tree, dict) else tree[b]


def folder_config(folder: pathlib.Path) -> dict:
    return json.loads((folder / "config.json").read_text())


def template_of(folder_cfg: dict, case: dict | None = None) -> str | None:
    """The aspect template stored with a case or its folder (None: inferred from the schedule)."""
    value = (case or {}).get("h_div_w_template", folder_cfg.get("h_div_w_template"))
    return None if value is None else schedules.template_key(float(value))


def pad_text(compact: np.ndarray, lens: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Packed text rows (sum lens, Ct) -> padded (B, max len, Ct) and mask (B, max len)."""
    b, t = len(lens), int(max(lens))
    text = np.zeros((b, t, compact.shape[1]), np.float32)
    mask = np.zeros((b, t), bool)
    starts = np.concatenate([[0], np.cumsum(lens)])
    for i, n in enumerate(lens):
        text[i, :n] = compact[starts[i]:starts[i] + n]
        mask[i, :n] = True
    return text, mask


def nhwc(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(np.transpose(x, (0, 2, 3, 1)))


def layout_of(mode: str, scale_schedule: np.ndarray, template: str | None) -> conditioning.SequenceLayout:
    return conditioning.sequence_layout(mode, schedules.as_schedule(scale_schedule), template)


def scale_inputs(targets: np.ndarray, layout: conditioning.SequenceLayout, k: int):
    """The next-scale inputs of target scale k (None for the SOS scale) from (B, L_tgt - 1, d)."""
    if k == 0:
        return None
    offsets = schedules.scale_offsets(layout.schedule)
    return jnp.asarray(targets[:, offsets[k] - 1:offsets[k + 1] - 1])


def random_params(model_cfg, seed: int = 0, std: float = 0.1) -> dict:
    """Random parameters (numpy normal) of a model config: a model "trained here", built without compiling."""
    abstract = nnx.eval_shape(lambda: transformer.Infinity(model_cfg, rngs=nnx.Rngs(0)))
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda a: (rng.normal(size=a.shape) * std).astype(np.float32),
                        transformer.param_dict(abstract))
