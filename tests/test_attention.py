"""Attention backends against a float64 numpy reference, on the mask shapes of Infinity / VAREdit.

Masks are built here from their definitions (not from conditioning.py): Infinity block-causal over scales;
VAREdit documents [source | scales] (blocks >= 1); "full" (role, scale) rules; SAR block 0 with keys
[pooled source per scale | source | targets]. Splash runs in Pallas interpret mode on CPU and is AOT-compiled for
a TPU v5p topology (needs libtpu).
"""
import numpy as np
import pytest

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P

from varedit_jax import attention
from varedit_jax.attention import SegmentMask, attend

SIZES = (1, 4, 9, 16, 36)  # target scales 1x1 .. 6x6
N_SRC = 36                 # the source is the last grid


def _segments(sizes):
    return np.repeat(np.arange(len(sizes)), sizes).astype(np.int32)


def _causal(k):
    return np.tril(np.ones((k, k), bool))


def infinity_mask(sizes=SIZES):
    """Block-causal over scales."""
    seg = _segments(sizes)
    return SegmentMask(seg, seg, _causal(len(sizes)))


def document_mask(sizes=SIZES, n_src=N_SRC):
    """[source | scales]: the source sees itself; scale k sees the source and scales <= k."""
    k = len(sizes)
    table = np.zeros((k + 1, k + 1), bool)
    table[:, 0] = True
    table[1:, 1:] = _causal(k)
    seg = _segments((n_src,) + tuple(sizes))
    return SegmentMask(seg, seg, table)


def full_mask(sizes=SIZES):
    """[source scales | target scales]: source j sees sources <= j; target k sees sources <= k and targets <= k."""
    k = len(sizes)
    table = np.zeros((2 * k, 2 * k), bool)
    table[:k, :k] = table[k:, :k] = table[k:, k:] = _causal(k)
    seg = _segments(tuple(sizes) * 2)
    return SegmentMask(seg, seg, table)


def sar_first_mask(sizes=SIZES, n_src=N_SRC):
    """Queries [source | targets], keys [pooled for scale 0 | ... | pooled for scale K-1 | source | targets]:
    the source sees the source; target k sees its pooled source and targets <= k."""
    k = len(sizes)
    table = np.zeros((1 + k, 2 * k + 1), bool)
    table[0, k] = True
    for i in range(k):
        table[1 + i, i] = True
        table[1 + i, k + 1:k + 2 + i] = True
    q_seg = _segments((n_src,) + tuple(sizes))
    kv_seg = _segments(tuple(sizes) + (n_src,) + tuple(sizes))
    return SegmentMask(q_seg, kv_seg, table)


def with_empty_rows(mask: SegmentMask, segment: int) -> SegmentMask:
    table = mask.table.copy()
    table[segment] = False
    return SegmentMask(mask.q_segments, mask.kv_segments, table)


MASKS = {"infinity": infinity_mask, "document": document_mask, "full": full_mask, "sar_first": sar_first_mask}


def reference(q, k, v, mask, key_mask=None, scale=1.0):
    """Dense float64 masked softmax attention; rows without a visible key are 0."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    visible = np.ones((1, 1, q.shape[1], k.shape[1]), bool)
    if mask is not None:
        visible = visible & mask.dense()[None, None]
    if key_mask is not None:
        visible = visible & np.asarray(key_mask)[:, None, None, :]
    logits = np.where(visible, np.einsum("bqnd,bknd->bnqk", q, k) * scale, -np.inf)
    peak = logits.max(-1, keepdims=True)
    e = np.exp(logits - np.where(np.isfinite(peak), peak, 0.0))
    total = e.sum(-1, keepdims=True)
    probs = np.where(total > 0, e / np.where(total > 0, total, 1.0), 0.0)
    return np.einsum("bnqk,bknd->bqnd", probs, v)


def dense_jnp(q, k, v, mask, key_mask=None, scale=1.0):
    """Dense fp32 jnp attention (for gradients); assumes every row sees a key."""
    visible = jnp.ones((1, 1, q.shape[1], k.shape[1]), bool)
    if mask is not None:
        visible = visible & jnp.asarray(mask.dense())[None, None]
    if key_mask is not None:
        visible = visible & key_mask[:, None, None, :]
    logits = jnp.einsum("bqnd,bknd->bnqk", q, k, precision="highest") * scale
    probs = jax.nn.softmax(jnp.where(visible, logits, -jnp.inf), axis=-1)
    return jnp.einsum("bnqk,bknd->bqnd", probs, v, precision="highest")


def inputs(mask, batch=2, heads=3, dim=16, seed=0):
    lq, lk = mask.shape
    keys = jax.random.split(jax.random.key(seed), 3)
    q = jax.random.normal(keys[0], (batch, lq, heads, dim))
    k, v = (jax.random.normal(key, (batch, lk, heads, dim)) for key in keys[1:])
    return q, k, v


F64 = dict(atol=5e-6, rtol=2e-6)  # fp32 backends vs the float64 reference (logits up to ~10 in magnitude)


def assert_grads_close(got, want):
    """fp32 gradients agree to ~1e-6 of their largest entry (sums over up to Lk products)."""
    want = np.asarray(want)
    np.testing.assert_allclose(np.asarray(got), want, atol=3e-6 * np.abs(want).max(), rtol=1e-5)


def random_key_mask(batch, length, seed=1):
    return jnp.asarray(np.random.default_rng(seed).random((batch, length)) > 0.25)


# ------------------------------------------------------------------------------------------------------ exact
@pytest.mark.parametrize("style", sorted(MASKS))
@pytest.mark.parametrize("chunk", [16, 37])
def test_exact_matches_reference(style, chunk):
    """Chunks of 16 / 37 rows split segments (37 leaves a padded last chunk); one chunk: the tests below."""
    mask = MASKS[style]()
    q, k, v = inputs(mask)
    out = attention.exact_attention(q, k, v, mask, scale=0.7, chunk=chunk)
    assert out.shape == q.shape and out.dtype == q.dtype
    np.testing.assert_allclose(np.asarray(out), reference(q, k, v, mask, scale=0.7), **F64)


def test_exact_empty_rows_and_key_mask():
    mask = with_empty_rows(document_mask(), segment=2)  # scale 1 (rows 37..40) sees nothing
    q, k, v = inputs(mask)
    key_mask = random_key_mask(2, mask.shape[1]).at[1].set(False)  # sample 1 sees no key at all
    want = reference(q, k, v, mask, key_mask, scale=0.5)
    for chunk in (16, 512):
        out = np.asarray(attention.exact_attention(q, k, v, mask, key_mask=key_mask, scale=0.5, chunk=chunk))
        np.testing.assert_allclose(out, want, **F64)
        assert not np.any(out[:, 37:41]) and not np.any(out[1])
    # key_mask alone (cross-attention to padded text)
    out = attend(q, k, v, key_mask=key_mask, scale=0.25)
    np.testing.assert_allclose(np.asarray(out), reference(q, k, v, None, key_mask, 0.25), **F64)


@pytest.mark.parametrize("style", ["document", "sar_first"])
def test_exact_gradients(style):
    mask = MASKS[style]()
    q, k, v = inputs(mask, heads=2)
    firsts = np.flatnonzero(np.diff(mask.kv_segments, prepend=-1))
    key_mask = random_key_mask(2, mask.shape[1]).at[:, firsts].set(True)  # every row keeps a key
    cot = jax.random.normal(jax.random.key(5), q.shape)

    def loss(fn):
        return lambda q, k, v: jnp.sum(fn(q, k, v) * cot)

    exact = jax.jit(jax.grad(loss(lambda q, k, v: attention.exact_attention(
        q, k, v, mask, key_mask=key_mask, scale=0.6, chunk=16)), argnums=(0, 1, 2)))(q, k, v)
    dense = jax.jit(jax.grad(loss(lambda q, k, v: dense_jnp(q, k, v, mask, key_mask, 0.6)), argnums=(0, 1, 2)))(
        q, k, v)
    for got, want in zip(exact, dense):
        assert_grads_close(got, want)


def test_exact_empty_rows_have_zero_gradient():
    mask = with_empty_rows(infinity_mask(), segment=3)
    q, k, v = inputs(mask)
    dq, dk, dv = jax.jit(jax.grad(lambda q, k, v: attention.exact_attention(q, k, v, mask, chunk=8).sum(),
                                  argnums=(0, 1, 2)))(q, k, v)
    rows = mask.q_segments == 3
    assert all(np.isfinite(np.asarray(g)).all() for g in (dq, dk, dv))
    assert not np.any(np.asarray(dq)[:, rows]) and np.any(np.asarray(dq)[:, ~rows])


def test_exact_is_memory_bounded():
    """A 1024 px 8B-length sequence (14617 tokens, VAREdit document mask), 4 heads of 32: the compiled forward
    and backward need less scratch than one head's fp32 (L, L) score matrix (dense: 4 heads' worth and more)."""
    sizes = tuple(s * s for s in (1, 2, 4, 6, 8, 12, 16, 20, 24, 32, 40, 48, 64))
    mask = document_mask(sizes, n_src=4096)
    length = mask.shape[0]
    assert length == 14617
    x = jax.ShapeDtypeStruct((1, length, 4, 32), jnp.float32)
    one_score_matrix = length * length * 4
    fwd = jax.jit(lambda q, k, v: attend(q, k, v, mask)).lower(x, x, x).compile()
    bwd = jax.jit(jax.grad(lambda q, k, v: attend(q, k, v, mask).sum(), argnums=(0, 1, 2))).lower(x, x, x).compile()
    for compiled in (fwd, bwd):
        assert compiled.memory_analysis().temp_size_in_bytes < one_score_matrix


# ------------------------------------------------------------------------------------------------------ xla
@pytest.mark.parametrize("style", ["infinity", "sar_first"])
def test_xla_matches_reference(style):
    mask = with_empty_rows(MASKS[style](), segment=1)
    q, k, v = inputs(mask)
    key_mask = random_key_mask(2, mask.shape[1])
    out = jax.jit(lambda q, k, v: attend(q, k, v, mask, key_mask=key_mask, scale=0.8, impl="xla"))(q, k, v)
    np.testing.assert_allclose(np.asarray(out), reference(q, k, v, mask, key_mask, 0.8), **F64)
    grads = [jax.jit(jax.grad(lambda q, k, v: jnp.sum(attend(q, k, v, mask, key_mask=key_mask, impl=impl) ** 2),
                              argnums=(0, 1, 2)))(q, k, v) for impl in ("xla", "exact")]
    for got, want in zip(*grads):
        assert_grads_close(got, want)


def test_xla_key_mask_only():
    """Cross-attention to padded text: no segment mask, one sample without any valid key."""
    q, k, v = inputs(infinity_mask())
    key_mask = random_key_mask(2, k.shape[1]).at[0].set(False)
    out = np.asarray(attend(q, k, v, key_mask=key_mask, scale=0.25, impl="xla"))
    np.testing.assert_allclose(out, reference(q, k, v, None, key_mask, 0.25), **F64)
    assert not np.any(out[0]) and np.all(np.any(out[1], axis=(1, 2)))


# ------------------------------------------------------------------------------------------------------ splash
@pytest.mark.parametrize("style", ["document", "sar_first"])
def test_splash_interpret_matches_reference(style):
    """Lq 102 / Lk 102 or 168 are padded to 128 / 256; one sample has no visible key; scale 1 (cosine attention)."""
    mask = MASKS[style]()
    q, k, v = inputs(mask, heads=2, dim=32)
    key_mask = random_key_mask(2, mask.shape[1]).at[1].set(False)
    out = jax.jit(lambda q, k, v: attend(q, k, v, mask, key_mask=key_mask, impl="splash_interpret"))(q, k, v)
    out = np.asarray(out)
    np.testing.assert_allclose(out, reference(q, k, v, mask, key_mask), **F64)
    assert not np.any(out[1])


@pytest.mark.slow
def test_splash_interpret_gradients_and_empty_rows():
    mask = with_empty_rows(full_mask(), segment=1)
    q, k, v = inputs(mask, heads=2, dim=32)
    key_mask = random_key_mask(2, mask.shape[1])
    out = attend(q, k, v, mask, key_mask=key_mask, scale=0.3, impl="splash_interpret")
    np.testing.assert_allclose(np.asarray(out), reference(q, k, v, mask, key_mask, 0.3), **F64)
    cot = jax.random.normal(jax.random.key(7), q.shape)
    grads = [jax.jit(jax.grad(lambda q, k, v: jnp.sum(attend(q, k, v, mask, key_mask=key_mask, scale=0.3,
                                                             impl=impl) * cot), argnums=(0, 1, 2)))(q, k, v)
             for impl in ("splash_interpret", "exact")]
    for got, want in zip(*grads):
        assert np.isfinite(np.asarray(got)).all()
        assert_grads_close(got, want)


@pytest.mark.slow
def test_splash_interpret_under_mesh():
    """On an 8-device CPU mesh the kernel runs in shard_map (batch over data x fsdp, heads over tensor)."""
    mesh = jax.make_mesh((2, 2, 2), ("data", "fsdp", "tensor"), axis_types=(jax.sharding.AxisType.Auto,) * 3)
    mask = document_mask()
    q, k, v = inputs(mask, batch=4, heads=2, dim=32)
    key_mask = random_key_mask(4, mask.shape[1])
    spec = NamedSharding(mesh, P(("data", "fsdp"), None, "tensor", None))
    with jax.set_mesh(mesh):
        q, k, v = (jax.device_put(x, spec) for x in (q, k, v))
        out = jax.jit(lambda q, k, v: attend(q, k, v, mask, key_mask=key_mask, impl="splash_interpret"))(q, k, v)
        hlo = jax.jit(lambda q, k, v: attend(q, k, v, mask, impl="splash_interpret")).lower(q, k, v).as_text()
    assert "shard_map" in hlo or "sdy.manual_computation" in hlo
    np.testing.assert_allclose(np.asarray(out), reference(q, k, v, mask, key_mask), **F64)


def test_splash_aot_compiles_for_v5p():
    """Forward and backward of a 256 px VAREdit layer (777 tokens, bf16, heads of 128) compile for a v5p-8 slice
    (4 chips; batch over fsdp, heads over tensor) on this CPU host."""
    pytest.importorskip("libtpu", reason="AOT compiles for TPU need libtpu (the tpu extra)")
    from varedit_jax import topology
    sizes = tuple(s * s for s in (1, 2, 4, 6, 8, 12, 16))
    mask = document_mask(sizes, n_src=256)
    assert mask.shape == (777, 777)
    mesh = topology.make_mesh("v5p-8", fsdp=2, tensor=2)
    x = jax.ShapeDtypeStruct((4, 777, 4, 128), jnp.bfloat16,
                             sharding=NamedSharding(mesh, P(("data", "fsdp"), None, "tensor", None)))

    def loss(q, k, v):
        return attend(q, k, v, mask, impl="splash").astype(jnp.float32).sum()

    with jax.set_mesh(mesh):
        fwd = jax.jit(lambda q, k, v: attend(q, k, v, mask, impl="splash")).lower(x, x, x).compile()
        bwd = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(x, x, x).compile()
    assert fwd.as_text().count('custom_call_target="tpu_custom_call"') == 1       # the forward kernel
    assert bwd.as_text().count('custom_call_target="tpu_custom_call"') == 3       # forward, dq, dkv
    per_device_scores = 2 * 2 * 896 * 896 * 4  # (B/2, N/2, L_pad, L_pad) fp32
    assert bwd.memory_analysis().temp_size_in_bytes < per_device_scores


@pytest.mark.slow
def test_splash_aot_compiles_sar_block0_at_1024px_on_v5p_128():
    """8B at 1024 px: SAR block 0 (14617 queries over 25138 keys, 28 heads of 128) forward + backward compile for
    v5p-128 (64 chips, 16 hosts; batch 16 over fsdp, heads over tensor), well below a dense per-device score tensor."""
    pytest.importorskip("libtpu", reason="AOT compiles for TPU need libtpu (the tpu extra)")
    from varedit_jax import topology
    sizes = tuple(s * s for s in (1, 2, 4, 6, 8, 12, 16, 20, 24, 32, 40, 48, 64))
    mask = sar_first_mask(sizes, n_src=4096)
    assert mask.shape == (14617, 25138)
    mesh = topology.make_mesh("v5p-128", fsdp=-1, tensor=4)
    spec = NamedSharding(mesh, P(("data", "fsdp"), None, "tensor", None))
    q = jax.ShapeDtypeStruct((16, 14617, 28, 128), jnp.bfloat16, sharding=spec)
    kv = jax.ShapeDtypeStruct((16, 25138, 28, 128), jnp.bfloat16, sharding=spec)

    def loss(q, k, v):
        return attend(q, k, v, mask, impl="splash").astype(jnp.float32).sum()

    with jax.set_mesh(mesh):
        compiled = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(q, kv, kv).compile()
    per_device_scores = 1 * 7 * 14848 * 25600 * 4  # (B/16, N/4, Lq_pad, Lk_pad) fp32
    assert compiled.memory_analysis().temp_size_in_bytes < per_device_scores / 10


def test_splash_mask_is_block_sparse():
    """The kernel's mask preprocessing sees blocks computed from segments: partial blocks only, deduplicated."""
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as splash_mask
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask_info as mask_info
    mask = infinity_mask((1, 4, 16, 64, 256, 1024, 2048))
    length, block = attention.splash_block(mask.shape[0])
    assert (length, block) == (3584, 512)
    padded = mask.padded(length, length)
    lazy = attention.SplashSegmentMask(padded)
    np.testing.assert_array_equal(lazy[slice(512, 1024), slice(0, 3584)], padded.dense()[512:1024])
    info, _ = mask_info.process_mask(splash_mask.MultiHeadMask([lazy] * 2), (block, block))
    dense = padded.dense().reshape(7, block, 7, block).transpose(0, 2, 1, 3).reshape(7, 7, -1)
    want = np.where(dense.all(-1), 2, np.where(dense.any(-1), 1, 0))  # 0 empty, 1 partial, 2 full
    np.testing.assert_array_equal(info.block_mask[0], want)
    assert 0 < info.partial_mask_blocks.shape[0] < (want == 1).sum()  # partial tiles are deduplicated


def test_splash_block():
    assert attention.splash_block(777) == (896, 128)
    assert attention.splash_block(1024) == (1024, 512)
    assert attention.splash_block(3545) == (3584, 512)
    assert attention.splash_block(14617) == (14848, 512)
    assert attention.splash_block(40) == (128, 128)


# ------------------------------------------------------------------------------------------------------ contract
def test_segment_mask_padded_and_validation():
    mask = sar_first_mask()
    padded = mask.padded(110, 170)
    dense = padded.dense()
    np.testing.assert_array_equal(dense[:102, :168], mask.dense())
    assert not dense[102:].any() and not dense[:, 168:].any()
    with pytest.raises(ValueError, match="kv_segments"):
        SegmentMask(mask.q_segments, mask.kv_segments + 100, mask.table)
    with pytest.raises(ValueError, match="bool"):
        SegmentMask(mask.q_segments, mask.kv_segments, mask.table.astype(np.int32))


def test_attend_rejects_bad_input():
    mask = infinity_mask()
    q, k, v = inputs(mask)
    with pytest.raises(ValueError, match="unknown attention impl"):
        attend(q, k, v, mask, impl="flash")
    with pytest.raises(ValueError, match="mask shape"):
        attend(q, k, v, document_mask())
    with pytest.raises(ValueError, match="key_mask"):
        attend(q, k, v, mask, key_mask=jnp.ones((2, 3), bool))
    with pytest.raises(ValueError, match="attention expects"):
        attend(q, k[:, :, :2], v, mask)
    if jax.default_backend() == "cpu":  # no silent fallback when cuDNN is configured but absent
        with pytest.raises(RuntimeError, match="cuDNN"):
            attend(q.astype(jnp.bfloat16), k.astype(jnp.bfloat16), v.astype(jnp.bfloat16), mask, impl="cudnn")
