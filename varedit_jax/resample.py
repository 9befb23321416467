"""Resampling of channels-last maps, numerically as PyTorch's `F.interpolate` used by the official code.

All functions take x of shape (B, H, W, C) (NHWC) and static output sizes; they are separable and written as two
small matmuls with constant (out, in) weight matrices built in numpy float32, evaluated at HIGHEST precision so
TPUs do not round to bf16.

- `area_resize`: `mode='area'` = adaptive average pooling. Output cell i averages input rows
  floor(i*H/h) .. ceil((i+1)*H/h)-1 (bins overlap and differ in size for non-integer ratios).
- `bilinear_resize`: `mode='bilinear'` / `'trilinear'` with T = 1, `align_corners=False`, no antialias, also when
  down-sampling: src = (dst + 0.5) * (in/out) - 0.5 clamped below at 0, i1 = min(i0 + 1, in - 1), fp32 weights.
- `pixel_unshuffle` / `pixel_shuffle`: `F.pixel_unshuffle(x, r)` channel order (c * r*r + i * r + j).
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np

_HIGHEST = jax.lax.Precision.HIGHEST


@functools.lru_cache(maxsize=None)
def area_matrix(n_in: int, n_out: int) -> np.ndarray:
    """(n_out, n_in) float32 averaging weights of adaptive average pooling along one axis."""
    m = np.zeros((n_out, n_in), np.float32)
    for i in range(n_out):
        start = (i * n_in) // n_out
        end = -((-(i + 1) * n_in) // n_out)  # ceil
        m[i, start:end] = np.float32(1.0) / np.float32(end - start)
    return m


@functools.lru_cache(maxsize=None)
def bilinear_matrix(n_in: int, n_out: int) -> np.ndarray:
    """(n_out, n_in) float32 weights of half-pixel linear interpolation along one axis (PyTorch rounding)."""
    m = np.zeros((n_out, n_in), np.float32)
    scale = np.float32(n_in) / np.float32(n_out)
    for o in range(n_out):
        src = max(np.float32((np.float32(o) + np.float32(0.5)) * scale - np.float32(0.5)), np.float32(0.0))
        i0 = min(int(np.floor(src)), n_in - 1)
        i1 = min(i0 + 1, n_in - 1)
        l1 = np.float32(src - np.float32(i0))
        l0 = np.float32(np.float32(1.0) - l1)
        m[o, i0] += l0
        m[o, i1] += l1
    return m


def _separable(x: jax.Array, mh: np.ndarray, mw: np.ndarray) -> jax.Array:
    x = jnp.einsum("hH,bHWc->bhWc", mh.astype(x.dtype), x, precision=_HIGHEST)
    return jnp.einsum("wW,bhWc->bhwc", mw.astype(x.dtype), x, precision=_HIGHEST)


def area_resize(x: jax.Array, size: tuple[int, int]) -> jax.Array:
    """Adaptive average pooling of x (B, H, W, C) to (B, h, w, C); identity when the size matches."""
    h, w = size
    if (h, w) == x.shape[1:3]:
        return x
    return _separable(x, area_matrix(x.shape[1], h), area_matrix(x.shape[2], w))


def bilinear_resize(x: jax.Array, size: tuple[int, int]) -> jax.Array:
    """Bilinear (half-pixel, no antialias) resize of x (B, H, W, C) to (B, h, w, C); identity at equal size."""
    h, w = size
    if (h, w) == x.shape[1:3]:
        return x
    return _separable(x, bilinear_matrix(x.shape[1], h), bilinear_matrix(x.shape[2], w))


def pixel_unshuffle(x: jax.Array, r: int = 2) -> jax.Array:
    """(B, H, W, C) -> (B, H/r, W/r, C*r*r) with output channel c*r*r + i*r + j = input (c, r*y+i, r*x+j)."""
    b, hh, ww, c = x.shape
    x = x.reshape(b, hh // r, r, ww // r, r, c)
    return x.transpose(0, 1, 3, 5, 2, 4).reshape(b, hh // r, ww // r, c * r * r)


def pixel_shuffle(x: jax.Array, r: int = 2) -> jax.Array:
    """Inverse of `pixel_unshuffle`: (B, h, w, C*r*r) -> (B, h*r, w*r, C)."""
    b, h, w, crr = x.shape
    c = crr // (r * r)
    x = x.reshape(b, h, w, c, r, r)
    return x.transpose(0, 1, 4, 2, 5, 3).reshape(b, h * r, w * r, c)
