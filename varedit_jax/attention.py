"""Masked multi-head attention with block-structured masks.

Every mask in Infinity / VAREdit is block-structured: each token belongs to a *segment* (a scale of the target,
the source, a scale of the pooled source, ...) and visibility is a property of the (query segment, key segment)
pair. `SegmentMask` stores exactly that, so no backend needs an (L, L) matrix as input:

  visible[q, k] = table[q_segments[q], kv_segments[k]]

Layouts: q (B, Lq, N, D), k and v (B, Lk, N, D) (batch, length, heads, head_dim), as jax.nn.dot_product_attention.
`key_mask` (B, Lk) bool masks keys per sample (text padding). Query rows with no visible key return zeros.
"""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np


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

    def dense(self, q_slice: slice = slice(None)) -> np.ndarray:
        """(Lq', Lk) bool mask for a range of query rows."""
        return self.table[self.q_segments[q_slice][:, None], self.kv_segments[None, :]]


def attend(q: jax.Array, k: jax.Array, v: jax.Array, mask: SegmentMask | None = None, *,
           key_mask: jax.Array | None = None, scale: float = 1.0, impl: str = "exact") -> jax.Array:
    """softmax(scale * q k^T + mask) v over each head; returns (B, Lq, N, D) in q's dtype.

    impl: "exact" (fp32 reference on any backend).
    """
    if impl != "exact":
        raise ValueError(f"unknown attention impl {impl!r}")
    visible = jnp.ones((1, 1, q.shape[1], k.shape[1]), bool)
    if mask is not None:
        visible = visible & jnp.asarray(mask.dense())[None, None]
    if key_mask is not None:
        visible = visible & key_mask[:, None, None, :]
    logits = jnp.einsum("bqnd,bknd->bnqk", q, k, preferred_element_type=jnp.float32) * scale
    logits = jnp.where(visible, logits, -jnp.inf)
    any_visible = visible.any(-1, keepdims=True)
    probs = jax.nn.softmax(jnp.where(any_visible, logits, 0.0), axis=-1) * any_visible
    out = jnp.einsum("bnqk,bknd->bqnd", probs.astype(v.dtype), v, preferred_element_type=jnp.float32)
    return out.astype(q.dtype)
