"""The optimizer of the official trainer: AdamW with its no-decay set, global-norm clipping, warmup + constant LR,
and an optional parameter EMA.

Config (`config.optim`):
  lr            peak learning rate (paper: 6e-5 at batch 1536 for 2B@256 and 8B@512, 1.875e-5 at 960 for 2B@512)
  warmup_steps  linear warmup from 0 (official: effectively none, `wp=1e-8` epochs)
  b1, b2, eps   AdamW moments (official `--ada=0.9_0.97`, eps 1e-8)
  weight_decay  0.005 (`twd`), on the decay set only
  clip          global-norm gradient clipping (`tclip=5`)
  ema_decay     0 (off, official default) or e.g. 0.9999 per step

No-decay set (official `trainer.py` param groups): `transformer.weight_decay` (decay = Linear weights and fused
projections; the test checks it against the official rule on the exported state dict's names and shapes).
"""
import math

import jax
import jax.numpy as jnp
import ml_collections
import optax

from varedit_jax import transformer


def default_config() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(dict(lr=6e-5, warmup_steps=0, b1=0.9, b2=0.97, eps=1e-8, weight_decay=0.005,
                                          clip=5.0, ema_decay=0.0))


def validate(cfg: ml_collections.ConfigDict) -> None:
    """Raises ValueError for values no run should train with: lr outside (0, 1], b1 / b2 outside [0, 1), eps,
    clip <= 0, weight_decay or ema_decay outside [0, 1), warmup_steps < 0, or any non-finite value."""
    bad = [f"{k}={v}" for k, v in cfg.items() if isinstance(v, float) and not math.isfinite(v)]
    ranges = {"lr": (0 < cfg.lr <= 1, "in (0, 1]"), "b1": (0 <= cfg.b1 < 1, "in [0, 1)"),
              "b2": (0 <= cfg.b2 < 1, "in [0, 1)"), "eps": (cfg.eps > 0, "> 0"), "clip": (cfg.clip > 0, "> 0"),
              "weight_decay": (0 <= cfg.weight_decay < 1, "in [0, 1)"),
              "ema_decay": (0 <= cfg.ema_decay < 1, "in [0, 1)"), "warmup_steps": (cfg.warmup_steps >= 0, ">= 0")}
    bad += [f"{k}={cfg[k]} (must be {want})" for k, (ok, want) in ranges.items()
            if not ok and math.isfinite(cfg[k])]
    if bad:
        raise ValueError("optim: " + "; ".join(bad))


def _path_keys(path) -> tuple:
    return tuple(getattr(k, "key", getattr(k, "idx", k)) for k in path)


def decay_mask(params) -> dict:
    """A tree of bools like `params` (the transformer's nested param dict): True = weight decay applies."""
    return jax.tree_util.tree_map_with_path(lambda path, _: transformer.weight_decay(_path_keys(path)), params)


def learning_rate(cfg: ml_collections.ConfigDict) -> optax.Schedule:
    """Linear warmup from 0 over `warmup_steps`, then constant `lr`."""
    if cfg.warmup_steps <= 0:
        return optax.constant_schedule(cfg.lr)
    return optax.linear_schedule(0.0, cfg.lr, cfg.warmup_steps)


def make(cfg: ml_collections.ConfigDict, params) -> optax.GradientTransformation:
    """clip_by_global_norm(clip) -> AdamW(learning_rate(cfg), b1, b2, eps, weight_decay on `decay_mask(params)`)."""
    return optax.chain(
        optax.clip_by_global_norm(cfg.clip),
        optax.adamw(learning_rate(cfg), b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay,
                    mask=decay_mask(params)))


def update_ema(ema, params, decay: float):
    """ema <- decay * ema + (1 - decay) * params (fp32)."""
    return jax.tree.map(lambda e, p: e * decay + p.astype(e.dtype) * (1.0 - decay), ema, params)


def global_norm(tree) -> jax.Array:
    return optax.tree.norm(jax.tree.map(lambda x: x.astype(jnp.float32), tree))
