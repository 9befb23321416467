"""Binary spherical quantization (BSQ) over a multi-scale schedule, as the official Infinity tokenizer and trainer.

Pure functions on channels-last float32 maps; every function is jit-able with the schedule static.

Layouts
  latent / features    (B, H, W, d) NHWC, H x W = the last grid of the VAE schedule.
  per-scale maps       (B, h_k, w_k, d), bits uint8 (1 <=> positive; bit j = latent channel j).
  token sequences      (B, L, D): scale-major, row-major inside a scale, L = sum_k h_k * w_k of the TRANSFORMER
                       schedule; D = d, or 4d with the d56 2x2 spatial patchify.
  x_BLC_wo_prefix      (B, L - 1, D): the transformer's inputs for scales 1..K-1 (the 1x1 slot is the SOS token).

Schedules are tuples of (h, w) (see `varedit_jax.schedules`). With `patchify` (the d56 / Infinity-8B tokenizer) the
quantizer runs on the VAE schedule, the transformer schedule with h, w doubled, and transformer-side maps are 2x2
pixel-unshuffled to 4d channels (`resample.pixel_unshuffle` channel order).

One BSQ step on a residual r (per position, over the d channels):
  u = r / max(||r||, 1e-12);  zhat = where(u > 0, +s, -s), s = float32(1/sqrt(d));  q = u + stop_gradient(zhat - u)
  bits = q > 0 (an exact 0 gives bit 0 and code -s). q equals zhat up to 1-2 ulp, as the official fp32 expression.
Codes from bits (`codes_from_bits`, official `indices_to_codes`): l2norm(bits * 2s - s).

The two residual forms of the official code are separate entry points (they can disagree on bits of exact ties):
  `encode_multiscale`  tokenizer path (`MultiScaleBSQ.forward`): R <- R - up(q_k).
  `flip_requant`       trainer path (`BitwiseSelfCorrection.flip_requant`): r_k = area(latent - sum_{j<k} up(q_j)),
                       with bitwise self-correction (flipped earlier bits feed the later residuals and inputs).
Resizes: down = area (adaptive average pooling), up and next-scale inputs = bilinear (half-pixel, no antialias, also
when down-sampling), both from `varedit_jax.resample`.
"""
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from varedit_jax import resample

Schedule = Sequence[tuple[int, int]]
NORM_EPS = 1e-12


# ----------------------------------------------------------------------------------------------------------------
# Schedules and token layout
# ----------------------------------------------------------------------------------------------------------------

def vae_schedule(schedule: Schedule, patchify: bool = False) -> tuple[tuple[int, int], ...]:
    """The grids the quantizer runs on: the transformer schedule, doubled with the 2x2 spatial patchify."""
    f = 2 if patchify else 1
    return tuple((int(h) * f, int(w) * f) for h, w in schedule)


def token_dim(d: int, patchify: bool = False) -> int:
    """D of transformer-side token arrays: d, or 4d with the 2x2 patchify."""
    return 4 * d if patchify else d


def _check_latent(latent: jax.Array, vae_sched: Schedule) -> None:
    if latent.ndim != 4:
        raise ValueError(f"latent must be (B, H, W, d), got shape {latent.shape}")
    if tuple(latent.shape[1:3]) != tuple(vae_sched[-1]):
        raise ValueError(f"latent grid {tuple(latent.shape[1:3])} does not match the last (VAE) scale "
                         f"{tuple(vae_sched[-1])} of the schedule")


def to_tokens(x: jax.Array, patchify: bool = False) -> jax.Array:
    """(B, h', w', d) VAE-layout map -> (B, h*w, D) tokens (2x2 pixel-unshuffled first with patchify)."""
    if patchify:
        x = resample.pixel_unshuffle(x, 2)
    return x.reshape(x.shape[0], -1, x.shape[-1])


def from_tokens(tokens: jax.Array, hw: tuple[int, int], patchify: bool = False) -> jax.Array:
    """(B, h*w, D) tokens of a transformer grid hw -> (B, h', w', d) VAE-layout map (inverse of `to_tokens`)."""
    x = tokens.reshape(tokens.shape[0], hw[0], hw[1], tokens.shape[-1])
    return resample.pixel_shuffle(x, 2) if patchify else x


def to_sequence(per_scale: Sequence[jax.Array], patchify: bool = False) -> jax.Array:
    """Per-scale (B, h_k', w_k', d) VAE-layout maps -> (B, L, D) scale-major token sequence."""
    return jnp.concatenate([to_tokens(x, patchify) for x in per_scale], axis=1)


def split_scales(seq: jax.Array, schedule: Schedule) -> list[jax.Array]:
    """(B, L, D) scale-major sequence -> list of (B, h_k * w_k, D), one per scale of `schedule`."""
    sizes = [h * w for h, w in schedule]
    if seq.shape[1] != sum(sizes):
        raise ValueError(f"sequence length {seq.shape[1]} != {sum(sizes)} tokens of schedule {tuple(schedule)}")
    offsets = np.cumsum([0] + sizes)
    return [seq[:, offsets[k]:offsets[k + 1]] for k in range(len(sizes))]


def source_grid(features: jax.Array, schedule: Schedule, patchify: bool = False) -> jax.Array:
    """VAREdit's source: the tokenizer's raw (unquantized) features area-resized to the finest VAE scale, in the
    transformer's token space as a grid (B, h_K, w_K, D) (D = d, or 4d with the 2x2 patchify)."""
    grid = resample.area_resize(features.astype(jnp.float32), vae_schedule(schedule, patchify)[-1])
    return resample.pixel_unshuffle(grid, 2) if patchify else grid


# ----------------------------------------------------------------------------------------------------------------
# BSQ on one scale
# ----------------------------------------------------------------------------------------------------------------

def l2_normalize(x: jax.Array, eps: float = NORM_EPS) -> jax.Array:
    """x / max(||x||_2, eps) over the last axis (`F.normalize(dim=-1)`)."""
    norm = jnp.sqrt(jnp.sum(x * x, axis=-1, keepdims=True))
    return x / jnp.maximum(norm, eps)


def codebook_scale(d: int) -> np.float32:
    """s = 1/sqrt(d) in float32, the magnitude of every code entry."""
    return np.float32(1.0 / np.sqrt(d))


def bsq(residual: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Quantizes (..., d) -> (codes (..., d) float32 = +-1/sqrt(d) with a straight-through gradient, bits uint8)."""
    u = l2_normalize(residual.astype(jnp.float32))
    s = codebook_scale(u.shape[-1])
    zhat = jnp.where(u > 0, s, -s)
    q = u + jax.lax.stop_gradient(zhat - u)
    return q, (q > 0).astype(jnp.uint8)


def codes_from_bits(bits: jax.Array) -> jax.Array:
    """(..., d) 0/1 bits -> codes l2norm(bits * 2s - s) (..., d) float32 (official `indices_to_codes`)."""
    s = codebook_scale(bits.shape[-1])
    return l2_normalize(bits.astype(jnp.float32) * s * np.float32(2) - s)


# ----------------------------------------------------------------------------------------------------------------
# Tokenizer path: MultiScaleBSQ.forward
# ----------------------------------------------------------------------------------------------------------------

class MultiScaleCodes(NamedTuple):
    """Result of `encode_multiscale`. Per-scale tuples follow the VAE schedule."""
    quantized: jax.Array              # (B, H, W, d) sum_k up(q_k): the decoder input
    bits: tuple[jax.Array, ...]       # (B, h_k, w_k, d) uint8
    codes: tuple[jax.Array, ...]      # (B, h_k, w_k, d) q_k
    residuals: tuple[jax.Array, ...]  # (B, h_k, w_k, d) BSQ input of scale k (ties: |residual| ~ 0)


def encode_multiscale(latent: jax.Array, schedule: Schedule, *, negate: jax.Array | None = None) -> MultiScaleCodes:
    """Multi-scale residual BSQ of latent (B, H, W, d) over the VAE `schedule` (R <- R - up(q_k), R detached).

    negate: optional (B, L_vae, d) 0/1 mask in VAE token layout; where set, the code is negated before it enters the
      residual and the output (the official `flip_quant`), while the bits stay as quantized. Used to teacher-force a
      bit decision (e.g. exact ties) and for code-flip augmentation.
    """
    _check_latent(latent, schedule)
    full = tuple(latent.shape[1:3])
    negate_k = split_scales(negate, schedule) if negate is not None else None
    residual = latent.astype(jnp.float32)
    quantized = jnp.zeros_like(residual)
    bits, codes, residuals = [], [], []
    for k, hw in enumerate(schedule):
        r_k = resample.area_resize(residual, hw)
        q_k, b_k = bsq(r_k)
        if negate_k is not None:
            q_k = jnp.where(negate_k[k].reshape(q_k.shape[:-1] + (-1,)) > 0, -q_k, q_k)
        up = resample.bilinear_resize(q_k, full)
        residual = residual - jax.lax.stop_gradient(up)
        quantized = quantized + up
        bits.append(b_k), codes.append(q_k), residuals.append(r_k)
    return MultiScaleCodes(quantized, tuple(bits), tuple(codes), tuple(residuals))


# ----------------------------------------------------------------------------------------------------------------
# Trainer path: BitwiseSelfCorrection.flip_requant
# ----------------------------------------------------------------------------------------------------------------

class TrainerInputs(NamedTuple):
    """Result of `flip_requant` (transformer token layout, D = d or 4d)."""
    x_BLC_wo_prefix: jax.Array        # (B, L - 1, D) next-scale inputs of scales 1..K-1
    gt_bits: jax.Array                # (B, L, D) uint8 labels (computed before any flip)
    flip_mask: jax.Array              # (B, L, D) uint8, 1 = that bit was flipped in the inputs
    residuals: tuple[jax.Array, ...]  # (B, h_k, w_k, d) BSQ input of scale k, VAE layout


def draw_flip_masks(key: jax.Array, batch: int, d: int, vae_sched: Schedule, noise_apply_layers: int,
                    noise_apply_strength: float) -> list[jax.Array | None]:
    """Random bitwise self-correction masks: a (B, h_k, w_k, d) bool map for VAE scales k < noise_apply_layers,
    None for the others.

    Per noisy scale the strength is drawn uniformly from {0, 0.01, ..., (n - 1) * 0.01}, n = int(100 p + 1) as the
    official `np.random.randint(0, 100 p + 1)` (one value per scale, shared by the batch); then every bit flips
    independently with that probability.
    """
    n_levels = int(100 * noise_apply_strength + 1)
    masks = []
    for k, (h, w) in enumerate(vae_sched):
        if k >= noise_apply_layers:
            masks.append(None)
            continue
        key, k_strength, k_mask = jax.random.split(key, 3)
        strength = jax.random.randint(k_strength, (), 0, n_levels).astype(jnp.float32) * np.float32(0.01)
        masks.append(jax.random.uniform(k_mask, (batch, h, w, d)) < strength)
    return masks


def _concat_inputs(inputs: Sequence[jax.Array], like: jax.Array, dim: int) -> jax.Array:
    """Concatenates next-scale inputs to (B, L - 1, D); a one-scale schedule has none."""
    if not inputs:
        return jnp.zeros((like.shape[0], 0, dim), jnp.float32)
    return jnp.concatenate(inputs, axis=1)


def _is_key(x: jax.Array) -> bool:
    return jnp.issubdtype(x.dtype, jax.dtypes.prng_key) or (x.dtype == jnp.uint32 and x.shape == (2,))


def flip_requant(latent: jax.Array, schedule: Schedule, flip: jax.Array | None = None, *, patchify: bool = False,
                 noise_apply_layers: int = -1, noise_apply_strength: float = 0.0,
                 requant: bool = True) -> TrainerInputs:
    """Transformer inputs and bit labels of latent (B, H, W, d) (official `flip_requant`).

    schedule: the TRANSFORMER schedule; the quantizer runs on `vae_schedule(schedule, patchify)`.
    flip: None (no self-correction), a (B, L, D) 0/1 mask in transformer token layout (teacher-forced masks), or a
      PRNG key (random masks for the first `noise_apply_layers` scales, see `draw_flip_masks`).
    requant: flipped bits are turned back into codes (`codes_from_bits`) for the cumulative map; without it the
      unflipped codes are used (flips then only show in `flip_mask`), as the official flag.
    Per scale k: r_k = area(latent - cum, size_k) (no resize at the last scale); (q_k, labels_k) = BSQ(r_k);
    flipped bits -> q_k; cum += up(q_k); x_{k+1} = bilinear(cum, size_{k+1}).
    """
    vae_sched = vae_schedule(schedule, patchify)
    _check_latent(latent, vae_sched)
    latent = latent.astype(jnp.float32)
    batch, d = latent.shape[0], latent.shape[-1]
    full = vae_sched[-1]
    if flip is None:
        masks = [None] * len(vae_sched)
    elif _is_key(flip):
        masks = draw_flip_masks(flip, batch, d, vae_sched, noise_apply_layers, noise_apply_strength)
    else:
        if flip.shape != (batch, sum(h * w for h, w in schedule), token_dim(d, patchify)):
            raise ValueError(f"flip mask shape {flip.shape} does not match (B, L, D) of schedule {tuple(schedule)}")
        masks = [from_tokens(m, hw, patchify) > 0 for m, hw in zip(split_scales(flip, schedule), schedule)]

    cum = jnp.zeros_like(latent)
    labels, inputs, flipped, residuals = [], [], [], []
    for k, hw in enumerate(vae_sched):
        r_k = resample.area_resize(latent - cum, hw)
        q_k, b_k = bsq(r_k)
        labels.append(b_k), residuals.append(r_k)
        if masks[k] is not None:
            flipped.append(masks[k])
            if requant:
                q_k = codes_from_bits(jnp.where(masks[k], 1 - b_k, b_k))
        else:
            flipped.append(jnp.zeros_like(b_k))
        cum = cum + resample.bilinear_resize(q_k, full)
        if k + 1 < len(vae_sched):
            inputs.append(to_tokens(resample.bilinear_resize(cum, vae_sched[k + 1]), patchify))
    return TrainerInputs(_concat_inputs(inputs, latent, token_dim(d, patchify)), to_sequence(labels, patchify),
                         to_sequence([m.astype(jnp.uint8) for m in flipped], patchify), tuple(residuals))


# ----------------------------------------------------------------------------------------------------------------
# Sampling path: per-scale bits -> summed codes and next-scale inputs (Infinity.autoregressive_infer_cfg)
# ----------------------------------------------------------------------------------------------------------------

def infer_step(summed: jax.Array, bits_k: jax.Array, schedule: Schedule, k: int, *,
               patchify: bool = False) -> tuple[jax.Array, jax.Array | None]:
    """Adds the sampled bits of scale k to the running latent; returns (summed, next-scale input or None).

    summed: (B, H, W, d) running sum of up-sampled codes (zeros before scale 0), H x W = last VAE grid.
    bits_k: (B, h_k * w_k, D) bits of transformer scale k (static k; shapes are static per scale).
    Returns the (B, h_{k+1} * w_{k+1}, D) input of scale k + 1, or None after the last scale.
    """
    vae_sched = vae_schedule(schedule, patchify)
    codes = codes_from_bits(from_tokens(bits_k, schedule[k], patchify))
    summed = summed + resample.bilinear_resize(codes, vae_sched[-1])
    if k + 1 == len(schedule):
        return summed, None
    return summed, to_tokens(resample.bilinear_resize(summed, vae_sched[k + 1]), patchify)


def infer_sequence(bits: jax.Array, schedule: Schedule, *, patchify: bool = False) -> tuple[jax.Array, jax.Array]:
    """All scales at once: bits (B, L, D) -> (summed latent (B, H, W, d), x_BLC_wo_prefix (B, L - 1, D))."""
    d = bits.shape[-1] // 4 if patchify else bits.shape[-1]
    h, w = vae_schedule(schedule, patchify)[-1]
    summed = jnp.zeros((bits.shape[0], h, w, d), jnp.float32)
    inputs = []
    for k, bits_k in enumerate(split_scales(bits, schedule)):
        summed, nxt = infer_step(summed, bits_k, schedule, k, patchify=patchify)
        if nxt is not None:
            inputs.append(nxt)
    return summed, _concat_inputs(inputs, bits, bits.shape[-1])
