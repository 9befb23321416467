"""The pure train step: loss of a batch (`compute_loss`), one optimizer step (`train_step`), the validation metrics
(`eval_step`), and the state they carry (`TrainState`). `trainer.Trainer` jits them over the mesh.

  source image -> frozen image tokenizer -> continuous features -> the transformer's source grid (never quantized)
  target image -> frozen image tokenizer -> features -> `flip_requant` with bitwise self-correction -> inputs + bits
  instruction  -> frozen flan-T5 in the step, or host-cached features (`text_feats`); `text.drop_rate` of the
                  samples get the learned `cfg_uncond` (CFG training)
  transformer -> per-bit CE (official weighting) -> grads (`grad_accum` micro-batches, scanned) -> clip + AdamW
  -> optional EMA. A step whose loss, gradients, new parameters or optimizer state are not all finite leaves the state
  unchanged and is counted.
RNG: step s uses `fold_in(key(seed), s)`, so a resumed run draws exactly what a straight run draws.
Batch (global arrays, leading dim B): source, target float32 (B, H, W, 3) in [-1, 1]; text_mask bool (B, T); and
text_ids int32 (B, T) or text_feats float32 (B, T, Ct).
"""
import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx, struct

from varedit_jax import conditioning, optim, quantizer, schedules, text, transformer


@struct.dataclass
class TrainState:
    """Everything the step changes. params / ema: the transformer's param dict (fp32 master weights)."""
    step: jax.Array           # () int32, optimizer steps taken (skipped steps included)
    params: Any
    opt_state: Any
    ema: Any                  # None when config.optim.ema_decay == 0
    bad_steps: jax.Array      # () int32, consecutive non-finite steps
    skipped: jax.Array        # () int32, non-finite steps so far

    def rest(self) -> dict:
        """Everything but the step and the params (the checkpoint's train_state item)."""
        return {"opt_state": self.opt_state, "ema": self.ema, "bad_steps": self.bad_steps, "skipped": self.skipped}


@dataclasses.dataclass(frozen=True)
class Frozen:
    """The graphdefs of the frozen image tokenizer and text encoder (static; their states are step arguments)."""
    image_tokenizer: Any
    text_encoder: Any


def sequence_layout(config, template: str) -> conditioning.SequenceLayout:
    """The sequence of a training config at an aspect template."""
    return conditioning.sequence_layout(config.conditioning, schedules.scale_schedule(template, config.pn), template)


def compute_loss(params, graphdef, frozen_models, batch: dict, key, *, config, layout, train: bool):
    """(loss, metrics) of one (micro-)batch; see the module docstring. frozen_models = (image tokenizer, text
    encoder)."""
    image_tok, text_encoder = frozen_models
    model_cfg = config.model
    k_bsc, k_drop, k_path = jax.random.split(key, 3)
    schedule = layout.schedule
    features = jax.lax.stop_gradient(image_tok.encode(jnp.concatenate([batch["source"], batch["target"]])))
    src_features, tgt_features = jnp.split(features, 2)
    inputs = quantizer.flip_requant(tgt_features, schedule, k_bsc if train else None, patchify=model_cfg.patchify,
                                    noise_apply_layers=config.bsc.noise_apply_layers,
                                    noise_apply_strength=config.bsc.noise_apply_strength, requant=config.bsc.requant)
    source = None
    if layout.source_grid is not None:
        source = quantizer.source_grid(src_features, schedule, model_cfg.patchify)
    if "text_feats" in batch:
        feats, mask = batch["text_feats"], batch["text_mask"]
    else:
        feats, mask = text.encode(text_encoder, batch["text_ids"], batch["text_mask"])
    feats = jax.lax.stop_gradient(feats.astype(jnp.float32))
    b = feats.shape[0]
    drop = jax.random.bernoulli(k_drop, config.text.drop_rate, (b,)) if train else jnp.zeros((b,), bool)
    model = nnx.merge(graphdef, params)
    logits = model(feats, mask, drop, source, inputs.x_BLC_wo_prefix, layout, dropout_key=k_path if train else None)
    loss, per_bit = transformer.bitwise_loss(logits, inputs.gt_bits, schedule,
                                             reweight_by_scale=config.loss.reweight_by_scale,
                                             label_smoothing=config.loss.label_smoothing)
    per_token = per_bit.mean((0, 2))
    offsets = np.cumsum([0] + [h * w for h, w in schedule])
    out = {"loss": loss, "bit_accuracy": transformer.bit_accuracy(logits, inputs.gt_bits).mean()}
    out.update({f"loss_scale{k}": per_token[offsets[k]:offsets[k + 1]].mean() for k in range(len(schedule))})
    return loss, out


def _microbatches(batch: dict, n: int) -> dict:
    """(B, ...) -> (n, B / n, ...) with micro-batch i = rows i, i + n, ... (each device keeps its own rows)."""
    return jax.tree.map(lambda x: x.reshape((x.shape[0] // n, n) + x.shape[1:]).swapaxes(0, 1), batch)


def _merge_frozen(frozen: Frozen, frozen_states) -> tuple:
    return nnx.merge(frozen.image_tokenizer, frozen_states[0]), nnx.merge(frozen.text_encoder, frozen_states[1])


def _all_finite(tree) -> jax.Array:
    """() bool: every floating-point leaf of `tree` is finite."""
    leaves = [jnp.isfinite(x).all() for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.floating)]
    return jnp.stack(leaves).all() if leaves else jnp.bool_(True)


def train_step(state: TrainState, frozen_states, batch: dict, *, graphdef, frozen: Frozen, tx, config,
               layout) -> tuple[TrainState, dict]:
    """One optimizer step (pure; jitted by `Trainer` with `state` donated)."""
    key = jax.random.fold_in(jax.random.key(config.seed), state.step)
    grad_fn = jax.value_and_grad(compute_loss, has_aux=True)
    loss_of = functools.partial(grad_fn, graphdef=graphdef, frozen_models=_merge_frozen(frozen, frozen_states),
                                config=config, layout=layout, train=True)
    n = config.grad_accum
    if n == 1:
        (_, aux), grads = loss_of(state.params, batch=batch, key=key)
    else:
        def body(carry, xs):
            micro, i = xs
            (_, m), g = loss_of(state.params, batch=micro, key=jax.random.fold_in(key, i))
            return jax.tree.map(jnp.add, carry, (m, g)), None
        zero = jax.tree.map(jnp.zeros_like, jax.eval_shape(lambda: loss_of(state.params, batch=jax.tree.map(
            lambda x: x[0], _microbatches(batch, n)), key=key))[0][1]), jax.tree.map(jnp.zeros_like, state.params)
        (aux, grads), _ = jax.lax.scan(body, zero, (_microbatches(batch, n), jnp.arange(n)))
        aux, grads = jax.tree.map(lambda x: x / n, (aux, grads))
    new, metrics = apply_gradients(state, grads, aux["loss"], tx, config)
    return new, dict(aux, **metrics)


def apply_gradients(state: TrainState, grads, loss: jax.Array, tx, config) -> tuple[TrainState, dict]:
    """One optimizer step from `grads` of `loss` (clip + AdamW + optional EMA); a step whose loss, gradients, new
    parameters or optimizer state are not all finite leaves the state unchanged and is counted. Returns (state,
    metrics: grad_norm, lr, finite, skipped)."""
    grad_norm = optim.global_norm(grads)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    # The step counts as finite only if the loss, the gradients, and what it writes (parameters and optimizer state:
    # a huge lr overflows the update with finite gradients) are all finite.
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & _all_finite((params, opt_state))
    ema = None if state.ema is None else optim.update_ema(state.ema, params, config.optim.ema_decay)
    keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)  # noqa: E731
    new = TrainState(step=state.step + 1, params=keep(params, state.params), opt_state=keep(opt_state, state.opt_state),
                     ema=None if ema is None else keep(ema, state.ema),
                     bad_steps=jnp.where(finite, 0, state.bad_steps + 1), skipped=state.skipped + (~finite))
    lr = optim.learning_rate(config.optim)(state.step)
    return new, dict(grad_norm=grad_norm, lr=lr, finite=finite, skipped=new.skipped)


def eval_step(params, frozen_states, batch: dict, *, graphdef, frozen: Frozen, config, layout) -> dict:
    return compute_loss(params, graphdef, _merge_frozen(frozen, frozen_states), batch, jax.random.key(0),
                        config=config, layout=layout, train=False)[1]
