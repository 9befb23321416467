"""Masked multi-head attention with block-structured masks, behind one entry point with several backends.

Every mask in Infinity / VAREdit is block-structured: each token belongs to a *segment* (a scale of the target,
the source, a scale of the pooled source, ...) and visibility is a property of the (query segment, key segment)
pair. `SegmentMask` stores exactly that, so no backend needs an (L, L) matrix as input:

  visible[q, k] = table[q_segments[q], kv_segments[k]]

Layouts: q (B, Lq, N, D), k and v (B, Lk, N, D) (batch, length, heads, head_dim), as jax.nn.dot_product_attention.
`key_mask` (B, Lk) bool masks keys per sample (text padding). Query rows with no visible key return zeros.

Backends (`impl`, the model's `attention_impl`):
  exact             fp32 (HIGHEST precision) masked softmax on any backend, queries processed in chunks of
                    `EXACT_CHUNK` rows (`jax.lax.map` of a rematerialised chunk), each chunk's (rows, Lk) mask
                    built from the segment ids inside the chunk: memory O(B·N·chunk·Lk) forward and backward,
                    never (Lq, Lk). The CPU path and the parity path; gradients by autodiff.
  xla, cudnn        `jax.nn.dot_product_attention` (implementation None / "cudnn": the cuDNN flash kernel on GPU,
                    which needs bf16/fp16 inputs). Materialises the dense (B|1, 1, Lq, Lk) boolean mask.
  splash            the Pallas TPU splash-attention kernel (forward and its own backward kernels), with the mask
                    given block-sparsely (`SplashSegmentMask`: only partial 128..512 tiles are stored, deduplicated);
                    lengths are padded to the kernel blocks. Under a multi-device mesh (`jax.set_mesh`) the kernel
                    runs in `jax.shard_map`, batch over the "batch" mesh axes and heads over the "heads" axes.
                    Used for the transformer's self-attention (and every call works: key_mask becomes
                    per-sample segment ids); short calls (cross-attention to text, one decode scale) cost a
                    128-padded tile each.
  splash_interpret  the same kernel in Pallas interpret mode (slow; runs on CPU, for tests).
"""
import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax.core import spmd
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash_kernel
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as splash_mask

from varedit_jax import sharding

IMPLS = ("exact", "xla", "cudnn", "splash", "splash_interpret")
EXACT_CHUNK = 512  # query rows per chunk of the exact path
# Splash: a virtual "sink" key with this logit and a zero value is in every softmax. It is far below any real logit
# (so exp(SINK - max) == 0: exact) and far above the kernel's mask value (so masked keys weigh exp(-huge) == 0):
# a row without visible keys has denominator exactly 1 and numerator 0, i.e. outputs zeros, in forward and backward.
_SPLASH_SINK = -1e30


@dataclasses.dataclass(frozen=True, eq=False)
class SegmentMask:
    """Block-structured visibility. Arrays are static numpy (shapes and masks are known at trace time).

    q_segments: (Lq,) int32 segment id of each query row.
    kv_segments: (Lk,) int32 segment id of each key.
    table: (Sq, Sk) bool, table[i, j] = queries of segment i see keys of segment j.
    """
    q_segments: np.ndarray
    kv_segments: np.ndarray
    table: np.ndarray

    def __post_init__(self):
        q, kv, table = (np.asarray(a) for a in (self.q_segments, self.kv_segments, self.table))
        for name, value in (("q_segments", q), ("kv_segments", kv), ("table", table)):
            object.__setattr__(self, name, value)
        if table.ndim != 2 or table.dtype != np.bool_:
            raise ValueError(f"SegmentMask table must be a 2-D bool array, got {table.dtype} {table.shape}")
        for name, ids, n in (("q_segments", q, table.shape[0]), ("kv_segments", kv, table.shape[1])):
            if ids.ndim != 1 or not np.issubdtype(ids.dtype, np.integer):
                raise ValueError(f"SegmentMask {name} must be a 1-D integer array, got {ids.dtype} {ids.shape}")
            if ids.size and (ids.min() < 0 or ids.max() >= n):
                raise ValueError(f"SegmentMask {name} must lie in [0, {n}), got [{ids.min()}, {ids.max()}]")

    @property
    def shape(self) -> tuple[int, int]:
        return len(self.q_segments), len(self.kv_segments)

    def dense(self, q_slice: slice = slice(None)) -> np.ndarray:
        """(Lq', Lk) bool mask for a range of query rows (materialises it)."""
        return self.table[self.q_segments[q_slice]][:, self.kv_segments]

    @functools.cached_property
    def key(self) -> tuple:
        """Content key (hashable): equal masks share the splash kernel's preprocessed mask."""
        return (self.q_segments.astype(np.int32).tobytes(), self.kv_segments.astype(np.int32).tobytes(),
                self.table.shape, np.packbits(self.table).tobytes())

    def visible_runs(self, rows: slice = slice(None)) -> tuple[tuple[int, int], ...]:
        """Maximal runs [lo, hi) of key positions visible to at least one query row in `rows` (static)."""
        return _key_runs(self.table[np.unique(self.q_segments[rows])].any(0)[self.kv_segments])

    def restrict(self, rows: slice, runs) -> "SegmentMask | None":
        """The mask of query `rows` over the keys gathered from `runs` ((lo, hi), ...); None when every such key is
        visible."""
        kv = np.concatenate([self.kv_segments[lo:hi] for lo, hi in runs])
        q = self.q_segments[rows]
        if self.table[np.ix_(np.unique(q), np.unique(kv))].all():
            return None
        return SegmentMask(q, kv, self.table)

    def padded(self, lq: int, lk: int) -> "SegmentMask":
        """The mask extended to (lq, lk): padded rows see nothing and padded keys are seen by nothing."""
        sq, sk = self.table.shape
        table = np.zeros((sq + 1, sk + 1), bool)
        table[:sq, :sk] = self.table
        q = np.concatenate([self.q_segments, np.full(lq - self.shape[0], sq)]).astype(np.int32)
        kv = np.concatenate([self.kv_segments, np.full(lk - self.shape[1], sk)]).astype(np.int32)
        return SegmentMask(q, kv, table)


def attend(q: jax.Array, k: jax.Array, v: jax.Array, mask: SegmentMask | None = None, *,
           key_mask: jax.Array | None = None, scale: float = 1.0, impl: str = "exact") -> jax.Array:
    """softmax(scale * q k^T + mask) v over each head; returns (B, Lq, N, D) in q's dtype.

    q (B, Lq, N, D), k/v (B, Lk, N, D), mask of shape (Lq, Lk) or None (all visible), key_mask (B, Lk) bool or
    None; rows without a visible key give zeros. impl: one of `IMPLS` (see the module docstring).
    """
    _check(q, k, v, mask, key_mask)
    if impl == "exact":
        return exact_attention(q, k, v, mask, key_mask=key_mask, scale=scale)
    if impl in ("xla", "cudnn"):
        return dot_product_attention(q, k, v, mask, key_mask=key_mask, scale=scale,
                                     implementation=None if impl == "xla" else "cudnn")
    if impl in ("splash", "splash_interpret"):
        return splash_attention(q, k, v, mask, key_mask=key_mask, scale=scale, interpret=impl == "splash_interpret")
    raise ValueError(f"unknown attention impl {impl!r}; expected one of {IMPLS}")


def _check(q, k, v, mask, key_mask):
    if q.ndim != 4 or k.shape != v.shape or k.ndim != 4 or q.shape[::2] != k.shape[::2] or q.shape[3] != k.shape[3]:
        raise ValueError(f"attention expects q (B, Lq, N, D) and k = v (B, Lk, N, D); got {q.shape}, {k.shape}, "
                         f"{v.shape}")
    if mask is not None and mask.shape != (q.shape[1], k.shape[1]):
        raise ValueError(f"mask shape {mask.shape} != (Lq, Lk) = {(q.shape[1], k.shape[1])}")
    if key_mask is not None and (key_mask.shape != (k.shape[0], k.shape[1]) or key_mask.dtype != jnp.bool_):
        raise ValueError(f"key_mask must be bool (B, Lk) = {(k.shape[0], k.shape[1])}, got {key_mask.dtype} "
                         f"{key_mask.shape}")


# ------------------------------------------------------------------------------------------------------ exact
@dataclasses.dataclass(frozen=True)
class Piece:
    """A run of query rows [lo, hi) of the exact path and the key runs it attends to (static).

    runs: ((lo, hi), ...) key positions gathered for these rows (every key any of the rows sees);
    visible: (n_segment_runs, n_keys) bool visibility of the gathered keys per query segment run, or None when
    every row sees every gathered key; row_run: (hi - lo,) int32 index of each row's segment run in `visible`.
    """
    lo: int
    hi: int
    runs: tuple[tuple[int, int], ...]
    visible: np.ndarray | None
    row_run: np.ndarray


def _key_runs(seen: np.ndarray) -> tuple[tuple[int, int], ...]:
    """Maximal runs [lo, hi) of True in a (Lk,) bool vector."""
    edges = np.flatnonzero(np.diff(np.concatenate([[0], seen.astype(np.int8), [0]])))
    return tuple((int(lo), int(hi)) for lo, hi in zip(edges[::2], edges[1::2]))


@functools.lru_cache(maxsize=256)
def _plan(mask: SegmentMask, chunk: int) -> tuple[Piece, ...]:
    """Splits the query rows into pieces (`Piece`) that skip invisible keys.

    Rows are grouped by runs of equal query segment (all rows of a run see the same keys); consecutive runs are
    merged into one piece when that is cheaper under a cost of (rows x gathered keys, x `_MASKED_COST` when some
    row does not see every gathered key) + `_PIECE_COST` per piece (dynamic programming over the runs). Pieces of
    several runs hold at most `chunk` rows; a longer run is one piece (mapped chunk by chunk). Runs that see no key
    are in no piece (their rows output zeros).
    """
    q = mask.q_segments
    starts = np.flatnonzero(np.diff(q, prepend=-1))
    bounds = list(zip(starts.tolist(), np.append(starts[1:], len(q)).tolist()))
    seen = [mask.table[q[lo]][mask.kv_segments] for lo, _ in bounds]
    # dynamic programming over consecutive runs that see some key: best[j] = cheapest split of runs [0, j)
    best, choice = [0.0] * (len(bounds) + 1), [0] * (len(bounds) + 1)
    for j in range(1, len(bounds) + 1):
        best[j], choice[j] = best[j - 1], j - 1  # run j - 1 alone (or skipped when it sees nothing)
        if seen[j - 1].any():
            best[j] += _piece_cost(bounds, seen, j - 1, j)
            for i in range(j - 2, -1, -1):
                if not seen[i].any() or bounds[j - 1][1] - bounds[i][0] > chunk:
                    break
                cost = best[i] + _piece_cost(bounds, seen, i, j)
                if cost < best[j]:
                    best[j], choice[j] = cost, i
    pieces, j = [], len(bounds)
    while j > 0:
        i = choice[j]
        if seen[j - 1].any():
            union = np.any(seen[i:j], axis=0)
            runs = _key_runs(union)
            keys = np.concatenate([np.arange(lo, hi) for lo, hi in runs])
            visible = np.stack([s[keys] for s in seen[i:j]])
            lo, hi = bounds[i][0], bounds[j - 1][1]
            row_run = np.repeat(np.arange(j - i), [b - a for a, b in bounds[i:j]]).astype(np.int32)
            pieces.append(Piece(lo, hi, runs, None if visible.all() else visible, row_run))
        j = i
    return tuple(reversed(pieces))


_PIECE_COST = 8192    # fixed cost of a piece, in (query row x key) score elements
_MASKED_COST = 1.25   # relative cost of a masked score element


def _piece_cost(bounds, seen, i: int, j: int) -> float:
    union = np.any(seen[i:j], axis=0)
    rows = bounds[j - 1][1] - bounds[i][0]
    masked = any((s != union).any() for s in seen[i:j])
    return rows * int(union.sum()) * (_MASKED_COST if masked else 1.0) + _PIECE_COST


def _softmax_attention(q, k, v, visible, key_visible, scale):
    """fp32 attention of q (B, N, C, D) over k, v (B, N, Lk, D) (heads-major). visible: (C | 1, Lk) bool (static
    mask) or None; key_visible: (B, 1, 1, Lk) bool or None. Without key_visible every row must see a key (the
    static mask is an additive bias); with it, rows that see no key output zeros."""
    hi = jax.lax.Precision.HIGHEST
    logits = jnp.einsum("bnqd,bnkd->bnqk", q, k, precision=hi) * scale
    if key_visible is None:
        if visible is not None:
            logits = logits + jnp.where(visible, 0.0, -jnp.inf).astype(logits.dtype)
        probs = jax.nn.softmax(logits, axis=-1)
    else:
        visible = key_visible if visible is None else visible & key_visible
        any_visible = visible.any(-1, keepdims=True)
        logits = jnp.where(visible, logits, -jnp.inf)
        probs = jax.nn.softmax(jnp.where(any_visible, logits, 0.0), axis=-1) * any_visible
    return jnp.einsum("bnqk,bnkd->bnqd", probs, v, precision=hi)


def exact_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: SegmentMask | None = None, *,
                    key_mask: jax.Array | None = None, scale: float = 1.0, chunk: int = EXACT_CHUNK) -> jax.Array:
    """The "exact" backend: fp32 attention over static pieces of query rows that skip invisible keys (`_plan`).

    Each piece gathers only the keys its rows see; a piece whose rows see all of them needs no mask. A piece of
    more than `chunk` rows (one long segment run) is padded to a multiple of `chunk` and mapped chunk by chunk
    (`jax.lax.map` over a `jax.checkpoint`ed chunk, so the backward pass recomputes one chunk's (B, N, chunk, keys)
    probabilities at a time): memory O(B·N·chunk·Lk), never (Lq, Lk). Masks are gathered at run time from small
    per-piece tables. Computes heads-major ((B, N, L, D): one transpose in and out).
    """
    b, lq, n, d = q.shape
    q32, k32, v32 = (x.astype(jnp.float32).transpose(0, 2, 1, 3) for x in (q, k, v))
    if mask is None:
        mask = SegmentMask(np.zeros(lq, np.int32), np.zeros(k.shape[1], np.int32), np.ones((1, 1), bool))
    outs, row = [], 0
    for piece in _plan(mask, chunk):
        if piece.lo > row:  # rows that see no key
            outs.append(jnp.zeros((b, n, piece.lo - row, d), jnp.float32))
        outs.append(_run_piece(q32[:, :, piece.lo:piece.hi], k32, v32, piece, key_mask, scale, chunk))
        row = piece.hi
    if row < lq:
        outs.append(jnp.zeros((b, n, lq - row, d), jnp.float32))
    out = outs[0] if len(outs) == 1 else jnp.concatenate(outs, axis=2)
    return out.transpose(0, 2, 1, 3).astype(q.dtype)


def _gather_keys(x: jax.Array, runs, axis: int) -> jax.Array:
    """Positions `runs` ((lo, hi), ...) of `axis`, concatenated."""
    parts = [jax.lax.slice_in_dim(x, lo, hi, axis=axis) for lo, hi in runs]
    return parts[0] if len(parts) == 1 else jnp.concatenate(parts, axis=axis)


SCORE_BUDGET = 1 << 21  # score elements of one batch group of the exact path (8 MiB of fp32)


def _batch_group(batch: int, per_sample: int) -> int:
    """The largest divisor of `batch` whose scores (`per_sample` elements each) stay within SCORE_BUDGET (>= 1)."""
    fits = max(1, SCORE_BUDGET // max(per_sample, 1))
    return max(g for g in range(1, batch + 1) if batch % g == 0 and g <= fits)


def _run_piece(q, k, v, piece: Piece, key_mask, scale, chunk):
    """Attention of one piece's query rows q (B, N, rows, D) over k, v (B, N, Lk, D) (see `exact_attention`)."""
    k, v = _gather_keys(k, piece.runs, 2), _gather_keys(v, piece.runs, 2)
    key_visible = None if key_mask is None else _gather_keys(key_mask, piece.runs, 1)[:, None, None, :]
    rows = piece.hi - piece.lo
    if piece.visible is None:
        visible = None
    elif len(piece.visible) == 1:
        visible = jnp.asarray(piece.visible)
    else:  # gathered at run time: no (rows, keys) literal for XLA to embed or constant-fold
        table, row_run = jax.lax.optimization_barrier((jnp.asarray(piece.visible), jnp.asarray(piece.row_run)))
        visible = jnp.take(table, row_run, axis=0)
    if rows <= chunk:
        b, n = q.shape[:2]
        group = _batch_group(b, n * rows * k.shape[2])
        if group == b:
            return _softmax_attention(q, k, v, visible, key_visible, scale)
        # the batch in groups whose scores stay within `SCORE_BUDGET` (cache-sized, one buffer reused)
        split = lambda x: None if x is None else x.reshape((b // group, group) + x.shape[1:])  # noqa: E731
        run = jax.checkpoint(lambda a: _softmax_attention(a[0], a[1], a[2], visible, a[3], scale), prevent_cse=False)
        out = jax.lax.map(run, (split(q), split(k), split(v), split(key_visible)))
        return out.reshape(q.shape)
    # one segment run (same visible row for every row): padded to whole chunks and mapped
    n_chunks = -(-rows // chunk)
    b, n, _, d = q.shape
    q = jnp.pad(q, ((0, 0), (0, 0), (0, n_chunks * chunk - rows), (0, 0)))
    q_chunks = jnp.moveaxis(q.reshape(b, n, n_chunks, chunk, d), 2, 0)
    run = jax.checkpoint(lambda q_rows: _softmax_attention(q_rows, k, v, visible, key_visible, scale),
                         prevent_cse=False)
    out = jax.lax.map(run, q_chunks)
    return jnp.moveaxis(out, 0, 2).reshape(b, n, n_chunks * chunk, d)[:, :, :rows]


# ------------------------------------------------------------------------------------------------------ xla / cudnn
def dot_product_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: SegmentMask | None = None, *,
                          key_mask: jax.Array | None = None, scale: float = 1.0,
                          implementation: str | None = None) -> jax.Array:
    """The "xla" / "cudnn" backends: `jax.nn.dot_product_attention` with a dense boolean mask (B|1, 1, Lq, Lk).

    Computes in the inputs' dtype (k, v cast to q's); cuDNN needs bf16/fp16. Rows without a visible key are zeroed.
    """
    visible = any_visible = None  # any_visible: (B|1, Lq|1, 1, 1), rows with a visible key
    if mask is not None:  # gathered at run time: no (Lq, Lk) literal for XLA to embed or constant-fold
        table, q_ids, kv_ids = jax.lax.optimization_barrier(
            (jnp.asarray(mask.table), jnp.asarray(mask.q_segments), jnp.asarray(mask.kv_segments)))
        visible = jnp.take(jnp.take(table, q_ids, axis=0), kv_ids, axis=1)[None, None]
        rows = mask.table[:, np.unique(mask.kv_segments)].any(1)[mask.q_segments]  # static
        any_visible = None if rows.all() else jnp.asarray(rows)[None, :, None, None]
    if key_mask is not None:
        key_visible = key_mask[:, None, None, :]
        visible = key_visible if visible is None else visible & key_visible
        any_visible = visible.any(-1)[:, 0, :, None, None]
    out = jax.nn.dot_product_attention(q, k.astype(q.dtype), v.astype(q.dtype), mask=visible, scale=scale,
                                       implementation=implementation)
    return out if any_visible is None else jnp.where(any_visible, out, jnp.zeros((), out.dtype))


# ------------------------------------------------------------------------------------------------------ splash
class SplashSegmentMask(splash_mask.Mask):
    """A `SegmentMask` seen by the splash kernel: blocks are computed on demand from the segment ids, so the
    kernel's mask preprocessing only keeps the (deduplicated) partial blocks, never the dense (Lq, Lk) array."""

    def __init__(self, mask: SegmentMask):
        self.mask = mask

    @property
    def shape(self) -> tuple[int, int]:
        return self.mask.shape

    def __getitem__(self, idx) -> np.ndarray:
        rows, cols = idx
        return self.mask.table[self.mask.q_segments[rows]][:, self.mask.kv_segments[cols]]

    def __eq__(self, other):
        return isinstance(other, SplashSegmentMask) and self.mask.key == other.mask.key

    def __hash__(self):
        return hash(self.mask.key)


def splash_block(length: int) -> tuple[int, int]:
    """(padded length, block size) for the splash kernel: lengths over 2048 are padded to a multiple of 512 and
    use 512-blocks; shorter ones are padded to a multiple of 128 and use the largest of 512/256/128 dividing it."""
    if length > 2048:
        return -(-length // 512) * 512, 512
    padded = -(-length // 128) * 128
    return padded, next(b for b in (512, 256, 128) if padded % b == 0)


def _splash_kernel(mask: SegmentMask, heads: int, interpret: bool) -> splash_kernel.SplashAttentionKernel:
    """The splash kernel (forward + dq/dkv backward) for a padded mask. Built at trace time; the mask
    preprocessing is cached by jax (`process_mask` lru_cache) through `SplashSegmentMask`'s content hash."""
    (_, bq), (_, bkv) = splash_block(mask.shape[0]), splash_block(mask.shape[1])
    blocks = splash_kernel.BlockSizes(block_q=bq, block_kv=bkv, block_kv_compute=bkv, block_q_dkv=bq,
                                      block_kv_dkv=bkv, block_kv_dkv_compute=bkv, block_q_dq=bq, block_kv_dq=bkv)
    multi = splash_mask.MultiHeadMask([SplashSegmentMask(mask)] * heads)
    return splash_kernel.make_splash_mha(multi, block_sizes=blocks, head_shards=1, q_seq_shards=1,
                                         interpret=interpret)


def splash_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: SegmentMask | None = None, *,
                     key_mask: jax.Array | None = None, scale: float = 1.0, interpret: bool = False) -> jax.Array:
    """The "splash" backend (layouts as `attend`): the Pallas TPU kernel, vmapped over the batch.

    q is scaled by `scale` (in fp32, then cast back) before the kernel, which has no scale. Lq and Lk are padded
    (`splash_block`); padded keys are masked by the segment table, `key_mask` by per-sample kv segment ids, and a
    sink logit makes rows without visible keys exactly zero. Under a multi-device mesh the call runs in
    `jax.shard_map` (see `_splash_specs`); the inputs are resharded to batch x heads as needed.
    """
    b, lq, n, d = q.shape
    lk = k.shape[1]
    (lq_pad, _), (lk_pad, _) = splash_block(lq), splash_block(lk)
    full = SegmentMask(np.zeros(lq, np.int32), np.zeros(lk, np.int32), np.ones((1, 1), bool))
    padded = (full if mask is None else mask).padded(lq_pad, lk_pad)

    def to_kernel(x, length):  # (B, L, N, D) -> (B, N, L_pad, D) in q's dtype
        return jnp.pad(x.astype(q.dtype), ((0, 0), (0, length - x.shape[1]), (0, 0), (0, 0))).transpose(0, 2, 1, 3)

    qt = to_kernel(q if scale == 1.0 else q.astype(jnp.float32) * scale, lq_pad)
    kt, vt = to_kernel(k, lk_pad), to_kernel(v, lk_pad)
    kv_ids = None if key_mask is None else jnp.pad(~key_mask, ((0, 0), (0, lk_pad - lk)), constant_values=True)

    def local(qt, kt, vt, kv_ids):
        kernel = _splash_kernel(padded, qt.shape[1], interpret)
        sinks = jnp.full((qt.shape[1],), _SPLASH_SINK, jnp.float32)
        if kv_ids is None:
            return jax.vmap(lambda q_, k_, v_: kernel(q_, k_, v_, sinks=sinks))(qt, kt, vt)
        segment_ids = splash_kernel.SegmentIds(q=jnp.zeros((qt.shape[0], lq_pad), jnp.int32),
                                               kv=kv_ids.astype(jnp.int32))
        return jax.vmap(lambda q_, k_, v_, s_: kernel(q_, k_, v_, segment_ids=s_, sinks=sinks))(
            qt, kt, vt, segment_ids)

    mesh = jax.sharding.get_abstract_mesh()
    if not mesh.empty and mesh.size > 1:
        batch, heads = _splash_specs(mesh, b, n)
        spec = jax.sharding.PartitionSpec(batch, heads, None, None)
        ids_spec = None if kv_ids is None else jax.sharding.PartitionSpec(batch, None)
        local = jax.shard_map(local, mesh=mesh, in_specs=(spec, spec, spec, ids_spec), out_specs=spec,
                              check_vma=False)
    out = local(qt, kt, vt, kv_ids)
    return out.transpose(0, 2, 1, 3)[:, :lq].astype(q.dtype)


def _splash_specs(mesh, batch: int, heads: int) -> tuple[tuple[str, ...] | None, tuple[str, ...] | None]:
    """Mesh axes for the batch and head dimensions of the splash shard_map: the axes the logical names "batch" and
    "heads" map to (the active `flax` logical-axis rules, else `sharding.DEFAULT_RULES`), keeping the leading ones
    whose sizes divide the dimension; the rest of the mesh computes replicas."""
    rules = dict(spmd.get_logical_axis_rules() or sharding.DEFAULT_RULES)
    batch_axes = sharding.axes_for(mesh, rules.get("batch"), batch, set())
    return batch_axes or None, sharding.axes_for(mesh, rules.get("heads"), heads, set(batch_axes)) or None
