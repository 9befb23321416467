"""2D rotary position embedding (RoPE) on the official Infinity / VAREdit position grids.

Every token gets an integer grid position (row, col). For a head of size D the D/2 rotation pairs are split in two
halves: pair m < D/4 rotates by row * inv_freq[m], pair m >= D/4 by col * inv_freq[m - D/4], with
inv_freq = 1 / 10000^(arange(0, D/2, 2) / (D/2)) in float32. Pairs are *interleaved* (dims 2m, 2m+1; GPT-J style):
(a, b) -> (a cos - b sin, a sin + b cos), applied in float32 after the cosine-attention normalisation.

Positions (official `precompute_rope2d_freqs_grid`, `rope2d_normalized_by_hw=2`, "star style"):
  - the table of an aspect template is always built from its **1M** (13-scale) schedule; (uph, upw) = its last grid.
  - target scale (h, w): token (i, j) -> (round(i * uph/h), round(j * upw/w)), products in float32, round half to
    even (`star_positions`). Infinity's table is the concatenation over the 13 1M scales; a sequence of L tokens
    (any `pn` is a prefix of the 1M schedule) uses its first L entries.
  - VAREdit doubles the base grid (256 positions per axis) and prepends a *source block*: the uph x upw grid at
    (i + uph, j + upw), row-major (`source_block_positions`). A sequence [source (n_src) | targets] uses table
    entries 0 .. n_src + L_tgt - 1 with n_src = h_K * w_K of the *current* schedule. At 1024 px (n_src = uph * upw)
    that is the paper's "(64, 64) offset"; at 256 / 512 px the slice never leaves the source block, so token n of
    the sequence sits at (uph + n // upw, upw + n % upw) -- the "folded raster" the released 256/512 px models
    were trained with (`official_positions` reproduces it; it is not a bug to fix here).
"""
import jax
import jax.numpy as jnp
import numpy as np

from varedit_jax import schedules

ROPE_BASE = 10000.0
INFINITY_GRID = 128  # positions per axis of Infinity's table (2048 px / 16)
VAREDIT_GRID = 256  # VAREdit doubles it to hold the source block


def inv_freq(head_dim: int) -> np.ndarray:
    """(head_dim // 4,) float32 rotation frequencies, as the official float32 computation."""
    if head_dim % 4:
        raise ValueError(f"2D RoPE needs head_dim divisible by 4, got {head_dim}")
    half = head_dim // 2
    exponent = np.arange(0, half, 2, dtype=np.float32) / np.float32(half)
    return (np.float32(1.0) / np.power(np.float32(ROPE_BASE), exponent)).astype(np.float32)


def star_positions(grid: tuple[int, int], final: tuple[int, int]) -> np.ndarray:
    """(h*w, 2) int32 positions of an (h, w) scale laid on the `final` (uph, upw) grid, row-major.

    round(i * (uph / h)) with the ratio a float32 scalar and the product and rounding in float32 (half to even).
    """
    (h, w), (uph, upw) = grid, final
    rows = np.round(np.arange(h, dtype=np.float32) * np.float32(uph / h)).astype(np.int32)
    cols = np.round(np.arange(w, dtype=np.float32) * np.float32(upw / w)).astype(np.int32)
    return np.stack(np.meshgrid(rows, cols, indexing="ij"), -1).reshape(-1, 2)


def final_grid(template: float | str) -> tuple[int, int]:
    """(uph, upw): the last grid of a template's 1M schedule, on which every position is laid."""
    return schedules.full_schedule(template)[-1]


def source_block_positions(template: float | str) -> np.ndarray:
    """(uph*upw, 2) int32: VAREdit's source block (i + uph, j + upw) over the template's 1M final grid."""
    uph, upw = final_grid(template)
    i, j = np.meshgrid(np.arange(uph), np.arange(upw), indexing="ij")
    return np.stack([i + uph, j + upw], -1).reshape(-1, 2).astype(np.int32)


def target_positions(template: float | str, schedule) -> np.ndarray:
    """(L, 2) int32 star positions of every scale of `schedule` (Infinity's layout; no folding)."""
    final = final_grid(template)
    return np.concatenate([star_positions(s, final) for s in schedule]).astype(np.int32)


def official_positions(template: float | str, schedule, *, source: bool) -> np.ndarray:
    """Positions of the official sequence exactly as the official table slicing gives them.

    source=False (Infinity): (L_tgt, 2) = the first L_tgt entries of the template's star table.
    source=True (VAREdit, finest-scale source): (n_src + L_tgt, 2) = the first n_src + L_tgt entries of
    [source block | star table], n_src = h_K * w_K of `schedule` (folded raster below 1M, see module docstring).
    `schedule` must be a prefix of the template's 1M schedule, as the official table lookup requires.
    """
    full = schedules.full_schedule(template)
    schedule = tuple(tuple(s) for s in schedule)
    if full[:len(schedule)] != schedule:
        raise ValueError(f"schedule {schedule} is not a prefix of the 1M schedule of template "
                         f"{schedules.template_key(template)}: {full}")
    table = target_positions(template, full)
    n = schedules.num_tokens(schedule)
    if source:
        table = np.concatenate([source_block_positions(template), table])
        n += schedule[-1][0] * schedule[-1][1]
    grid = VAREDIT_GRID if source else INFINITY_GRID
    if table.max() >= grid:
        raise ValueError(f"template {template}: positions reach {table.max()} >= the {grid}-wide base grid")
    return table[:n]


def cos_sin(positions: np.ndarray | jax.Array, head_dim: int) -> tuple[jax.Array, jax.Array]:
    """(cos, sin), each (L, head_dim // 2) float32, of integer positions (L, 2)."""
    freqs = jnp.asarray(inv_freq(head_dim))
    pos = jnp.asarray(positions).astype(jnp.float32)
    angles = jnp.concatenate([pos[:, :1] * freqs, pos[:, 1:] * freqs], axis=-1)
    return jnp.cos(angles), jnp.sin(angles)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotates interleaved pairs (a, c) of x (B, L, N, D) by (cos, sin) (L, D/2) to (a cos - c sin, c cos + a sin);
    float32 in and out. Written as x * cos' + swap(x) * sin' (swap = the pairs reversed) so that it fuses into one
    elementwise pass forward and backward."""
    b, l, n, d = x.shape
    x = x.astype(jnp.float32)
    swapped = x.reshape(b, l, n, d // 2, 2)[..., ::-1].reshape(b, l, n, d)
    cos2 = jnp.repeat(cos, 2, axis=-1)[None, :, None, :]
    sin2 = jnp.stack([-sin, sin], axis=-1).reshape(l, d)[None, :, None, :]
    return x * cos2 + swapped * sin2
