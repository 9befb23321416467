"""The Infinity / VAREdit transformer (official `infinity.models.infinity.Infinity`, 2B/8B flags) in Flax NNX.

One model for text-to-image (Infinity) and editing (VAREdit): the source conditioning only changes the sequence
layout and the attention masks (`varedit_jax.conditioning`), never the parameters.

Text path (float32):
  text (B, T, Ct) + mask (B, T) -> dropped samples (`drop_text`, CFG dropout / uncond rows): the valid rows are
  replaced by `cfg_uncond[:len]` -> `text_norm` (RMSNorm) -> `text_proj_for_sos` (TextAttentivePool: a learned query
  attends over the sample's own tokens) = cond (B, C) -> `shared_ada_lin` (SiLU -> Linear C -> 6C) = ada (B, 6, C);
  `text_proj_for_ca` (Linear -> GELU(tanh) -> Linear) = the cross-attention keys/values (B, T, C).
Tokens: source rows `word_embed(source)`, SOS = cond + pos_start, target rows `word_embed(next-scale inputs)`;
  `lvl_embed[level]` added once before block 0 (float32).
Block (pre-norm, float32 residual stream; block matmuls and attention in `config.dtype`):
  gamma1, gamma2, scale1, scale2, shift1, shift2 = ada + ada_gss (this order)
  x += SA(LN(x) (1 + scale1) + shift1) gamma1      cosine attention: q, k L2-normalised per head,
                                                    q *= exp(min(scale_mul, log 100)), 2D RoPE, softmax scale 1
  x += CA(ca_norm(x), text)                          scale 1/sqrt(head_dim), per-sample text key mask
  x += FFN(LN(x) (1 + scale2) + shift2) gamma2       GELU(tanh)
Head (float32): AdaLNBeforeHead (SiLU -> Linear C -> 2C: scale, shift) then Linear C -> V = 2d; logits pair
  (2j, 2j+1) = (bit j = 0, bit j = 1).

Layouts: text (B, T, Ct) with T <= text_max_len; source (B, h_K, w_K, d) grid; targets (B, L_tgt - 1, d) (the
next-scale inputs of scales 1..K-1, row-major); logits (B, L_tgt, 2d) for SOS + targets.

Blocks: `config.scan_layers` stacks the block parameters along a leading "layers" axis and runs blocks 1..depth-1
with `jax.lax.scan` (block 0 -- SAR's different block -- runs on its own slice); otherwise a Python loop over
`blocks[i]`. Both call the same block code (`CrossAttnBlock`) through `nnx.merge`, wrapped in `jax.checkpoint` with
`config.remat` ("none", "full" or a `jax.checkpoint_policies` name).
Compile time of one jitted train step (forward + per-bit CE + backward, fp32, B = 1, 256 px SAR layout = 777
tokens, 64 text tokens, remat "full"), CPU (2 cores), `jax.jit(...).lower(abstract).compile()` on abstract shapes:
  2B shapes, depth 32:  scanned  39 s   looped 322 s
  8B shapes, depth 40:  scanned  42 s   looped 413 s
-> scanned by default (the compile time of the loop grows linearly with depth).

KV-cached incremental decoding (`init_decode`, `decode_scale`): every block keeps a static-shape key/value store
laid out like its teacher-forcing keys ([pooled source | source | targets] for block 0, [source | targets] for the
others). `init_decode` runs the text path and the source rows (SAR: also pools block 0's source keys/values to
every target scale); `decode_scale` runs the rows of one target scale, writes their keys/values and attends to the
keys its mask makes visible -- logits equal the teacher-forcing forward.
"""
import math
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx, struct

from varedit_jax import conditioning, rope
from varedit_jax.attention import attend
from varedit_jax.conditioning import SequenceLayout
from varedit_jax.params import load_param_dict, logical_init, logical_param
from varedit_jax.params import param_dict  # noqa: F401  (re-exported: transformer.param_dict)

MAX_SCALE_MUL = math.log(100.0)
NUM_ADA = 6  # gamma1, gamma2, scale1, scale2, shift1, shift2


# Shapes of the released models (official `infinity_2b` / the 8B of `tools/run_infinity.py`; §3.1 of the notes).
OFFICIAL_SHAPES = {
    "2b": dict(embed_dim=2048, depth=32, num_heads=16, bits=32, patchify=False, text_dim=2048, text_max_len=512,
               block_chunks=8),
    "8b": dict(embed_dim=3584, depth=40, num_heads=28, bits=56, patchify=True, text_dim=2048, text_max_len=512,
               block_chunks=8),
}


def official_text_pool_heads(text_dim: int, embed_dim: int) -> int:
    """Heads of the official TextAttentivePool: text_dim // (128 if embed_dim <= 4096 else 64)."""
    return text_dim // (128 if embed_dim <= 4096 else 64)


def official_mlp_dim(embed_dim: int, mlp_ratio: float = 4.0) -> int:
    """FFN hidden width of the official blocks: round(C * mlp_ratio / 256) * 256 (Python rounding)."""
    return round(embed_dim * mlp_ratio / 256) * 256


def default_model_config(**overrides) -> ml_collections.ConfigDict:
    """The model sub-config: Infinity-2B unless overridden; `mlp_dim` and `text_pool_heads` follow the official
    rules from the (overridden) widths unless given.

    Shapes: embed_dim C, depth, num_heads, mlp_dim (FFN width), bits (d = transformer token channels, 2d logits),
    text_dim (Ct), text_max_len (rows of cfg_uncond = the longest text), text_pool_heads, num_levels (lvl_embed).
    Export: block_chunks (official key names `block_chunks.{c}.module.{j}`), cfg_uncond_export_rows (512, what the
    official loader expects). patchify: the tokens are 2x2 pixel-unshuffled tokenizer latents (d = 4 x 14, 8B).
    Compute: dtype of the block matmuls and attention ("float32" / "bfloat16"; the rest is float32),
    attention_impl (`attention.attend` backend), remat ("none", "full" or a jax.checkpoint_policies name),
    scan_layers. Training: drop_path_rate (linspace over blocks), init_std (<= 0: sqrt(1 / 3C)), aln_init,
    aln_gamma_init, head_init_scale (official special_init).
    """
    cfg = ml_collections.ConfigDict(dict(
        embed_dim=2048, depth=32, num_heads=16, mlp_dim=-1, bits=32, text_dim=2048, text_max_len=512,
        text_pool_heads=-1, num_levels=15, norm_eps=1e-6, block_chunks=8, cfg_uncond_export_rows=512,
        patchify=False, dtype="float32", attention_impl="exact", remat="full", scan_layers=True,
        drop_path_rate=0.1, init_std=-1.0, aln_init=1e-3, aln_gamma_init=5e-6, head_init_scale=0.02))
    unknown = sorted(set(overrides) - set(cfg.keys()))
    if unknown:
        raise ValueError(f"unknown transformer config fields {unknown}")
    cfg.update(overrides)
    if cfg.mlp_dim <= 0:
        cfg.mlp_dim = official_mlp_dim(cfg.embed_dim)
    if cfg.text_pool_heads <= 0:
        cfg.text_pool_heads = official_text_pool_heads(cfg.text_dim, cfg.embed_dim)
    return cfg


def validate_config(cfg: ml_collections.ConfigDict) -> None:
    """Raises ValueError for shapes the official model cannot have."""
    if cfg.embed_dim % cfg.num_heads or (cfg.embed_dim // cfg.num_heads) % 4:
        raise ValueError(f"embed_dim {cfg.embed_dim} / num_heads {cfg.num_heads} must give a head_dim divisible by 4")
    if cfg.text_pool_heads < 1 or cfg.embed_dim % cfg.text_pool_heads:
        raise ValueError(f"text_pool_heads {cfg.text_pool_heads} must be >= 1 and divide embed_dim {cfg.embed_dim}")
    if cfg.depth < 1 or cfg.depth % cfg.block_chunks:
        raise ValueError(f"depth {cfg.depth} must be a positive multiple of block_chunks {cfg.block_chunks}")
    if cfg.remat not in ("none", "full") and not hasattr(jax.checkpoint_policies, cfg.remat):
        raise ValueError(f"unknown remat policy {cfg.remat!r}")


# --------------------------------------------------------------------------------------------------- primitives
def layer_norm(x: jax.Array, eps: float) -> jax.Array:
    """LayerNorm without affine parameters (official `ln_wo_grad` / fused AdaLN), in float32."""
    x = x.astype(jnp.float32)
    mean = x.mean(-1, keepdims=True)
    var = jnp.square(x - mean).mean(-1, keepdims=True)
    return (x - mean) * jax.lax.rsqrt(var + eps)


def l2_normalize(x: jax.Array, eps: float = 1e-12) -> jax.Array:
    """F.normalize(x, dim=-1): x / max(||x||, eps), float32."""
    x = x.astype(jnp.float32)
    return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), eps)


def _normal(std: float):
    return nnx.initializers.normal(std)


def _param(init, shape, names, rngs: nnx.Rngs) -> nnx.Param:
    return logical_param(init(rngs.params(), shape, jnp.float32), names)


def _linear(din: int, dout: int, names: tuple[str, str], rngs: nnx.Rngs, *, std: float, dtype=jnp.float32,
            use_bias: bool = True) -> nnx.Linear:
    """nnx.Linear (kernel (din, dout) = official weight transposed), zero bias, logical names on both."""
    return nnx.Linear(din, dout, use_bias=use_bias, dtype=dtype, param_dtype=jnp.float32, rngs=rngs,
                      kernel_init=logical_init(_normal(std), names),
                      bias_init=logical_init(nnx.initializers.zeros_init(), names[1:]))


def fused_projection(x: jax.Array, kernel: jax.Array) -> list[jax.Array]:
    """x (..., Cin) through a fused kernel (Cin, J, Cout) -> J arrays (..., Cout): one 2-D matmul, then a split
    (whose gradient is one concatenation, and whose kernel gradient needs no transposed copy)."""
    cin, j, cout = kernel.shape
    out = jnp.einsum("...c,cd->...d", x, kernel.reshape(cin, j * cout))
    return jnp.split(out, j, axis=-1)


def drop_path(x: jax.Array, rate: jax.Array, key: jax.Array | None) -> jax.Array:
    """Stochastic depth (timm DropPath) per sample: keep with prob 1 - rate, rescaled; identity without a key."""
    if key is None:
        return x
    keep = jax.random.bernoulli(key, 1.0 - rate, (x.shape[0],) + (1,) * (x.ndim - 1))
    return jnp.where(keep, x / (1.0 - rate), 0.0).astype(x.dtype)


@struct.dataclass
class TextContext:
    """Per-sample text conditioning, float32. cond (B, C) = pooled text (SOS / AdaLN input); ada (B, 6, C) =
    shared_ada_lin(cond); kv (B, T, C) = text_proj_for_ca output; mask (B, T) bool valid text tokens."""
    cond: jax.Array
    ada: jax.Array
    kv: jax.Array
    mask: jax.Array


@struct.dataclass
class DecodeState:
    """KV-cached decoding state. first_k/first_v (B, P + L, N, hd): block 0's key/value store ([pooled source |
    sequence]); k/v (depth - 1, B, L, N, hd): blocks 1.. (stacked); L = the layout's full length."""
    text: TextContext
    first_k: jax.Array
    first_v: jax.Array
    k: jax.Array
    v: jax.Array


# ------------------------------------------------------------------------------------------------------ modules
class RMSNorm(nnx.Module):
    """`text_norm` (official FastRMSNorm): x * rsqrt(mean(x^2) + eps) * weight, float32."""

    def __init__(self, dim: int, eps: float, names: tuple[str]):
        self.eps = eps
        self.weight = logical_param(jnp.ones((dim,), jnp.float32), names)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x.astype(jnp.float32)
        return x * jax.lax.rsqrt(jnp.square(x).mean(-1, keepdims=True) + self.eps) * self.weight[...]


class AffineLayerNorm(nnx.Module):
    """`ca_norm`: LayerNorm with weight and bias, float32."""

    def __init__(self, dim: int, eps: float):
        self.eps = eps
        self.weight = logical_param(jnp.ones((dim,), jnp.float32), ("norm",))
        self.bias = logical_param(jnp.zeros((dim,), jnp.float32), ("norm",))

    def __call__(self, x: jax.Array) -> jax.Array:
        return layer_norm(x, self.eps) * self.weight[...] + self.bias[...]


class TextAttentivePool(nnx.Module):
    """`text_proj_for_sos`: a learned query `mat_q` (heads, C/heads) attends over each sample's own text tokens;
    keys/values `mat_kv` (Ct -> 2C, bias [0 | v_bias]); softmax scale 1/sqrt(C/heads); then `proj`. float32."""

    def __init__(self, text_dim: int, embed_dim: int, heads: int, rngs: nnx.Rngs, *, std: float):
        self.heads, self.head_dim = heads, embed_dim // heads
        self.mat_q = _param(_normal(std), (heads, self.head_dim), ("unmodeled", "unmodeled"), rngs)
        self.mat_kv = _param(_normal(std), (text_dim, 2, embed_dim), ("text_embed", "unmodeled", "heads"), rngs)
        self.v_bias = _param(nnx.initializers.zeros_init(), (embed_dim,), ("heads",), rngs)
        self.proj = _linear(embed_dim, embed_dim, ("heads", "embed"), rngs, std=std)

    def __call__(self, text: jax.Array, mask: jax.Array) -> jax.Array:
        b, t, _ = text.shape
        k, v = fused_projection(text, self.mat_kv[...])
        v = v + self.v_bias[...]
        q = jnp.broadcast_to(self.mat_q[...], (b, 1, self.heads, self.head_dim))
        out = attend(q, k.reshape(b, t, self.heads, self.head_dim), v.reshape(b, t, self.heads, self.head_dim),
                     key_mask=mask, scale=1.0 / math.sqrt(self.head_dim))
        return self.proj(out.reshape(b, -1))


class SelfAttention(nnx.Module):
    """Cosine self-attention: `mat_qkv` (C -> [q | k | v], no bias) + [q_bias | 0 | v_bias]; per head q, k
    L2-normalised, q *= exp(min(scale_mul, log 100)); 2D RoPE on q and k (float32); attention with softmax scale 1
    (delegated to an `attention(q, k, v)` callable that knows the mask / KV store); `proj`."""

    def __init__(self, cfg, rngs: nnx.Rngs, *, std: float, dtype):
        c, self.heads = cfg.embed_dim, cfg.num_heads
        self.head_dim = c // self.heads
        self.dtype = dtype
        self.mat_qkv = _param(_normal(std), (c, 3, c), ("embed", "unmodeled", "heads"), rngs)
        self.q_bias = _param(nnx.initializers.zeros_init(), (c,), ("heads",), rngs)
        self.v_bias = _param(nnx.initializers.zeros_init(), (c,), ("heads",), rngs)
        self.scale_mul = logical_param(jnp.full((self.heads,), math.log(4.0), jnp.float32), ("norm",))
        self.proj = _linear(c, c, ("heads", "embed"), rngs, std=std, dtype=dtype)

    def qkv(self, x: jax.Array, cos: jax.Array, sin: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        """x (B, L, C) -> q, k, v (B, L, N, hd): q/k normalised, scaled and rotated, all in the compute dtype."""
        b, l, _ = x.shape
        q, k, v = fused_projection(x.astype(self.dtype), self.mat_qkv[...].astype(self.dtype))
        q = (q + self.q_bias[...].astype(self.dtype)).reshape(b, l, self.heads, self.head_dim)
        k = k.reshape(b, l, self.heads, self.head_dim)
        v = (v + self.v_bias[...].astype(self.dtype)).reshape(b, l, self.heads, self.head_dim)
        scale = jnp.exp(jnp.minimum(self.scale_mul[...], MAX_SCALE_MUL))[:, None]
        q = rope.apply_rope(l2_normalize(q) * scale, cos, sin)
        k = rope.apply_rope(l2_normalize(k), cos, sin)
        return q.astype(self.dtype), k.astype(self.dtype), v


class CrossAttention(nnx.Module):
    """Attention from the tokens to the projected text: `mat_q` (C -> C, bias), `mat_kv` (C -> 2C, bias
    [0 | v_bias]), scale 1/sqrt(head_dim), keys masked per sample, `proj`."""

    def __init__(self, cfg, rngs: nnx.Rngs, *, std: float, dtype, impl: str):
        c, self.heads = cfg.embed_dim, cfg.num_heads
        self.head_dim, self.dtype, self.impl = c // self.heads, dtype, impl
        self.mat_q = _linear(c, c, ("embed", "heads"), rngs, std=std, dtype=dtype)
        self.mat_kv = _param(_normal(std), (c, 2, c), ("embed", "unmodeled", "heads"), rngs)
        self.v_bias = _param(nnx.initializers.zeros_init(), (c,), ("heads",), rngs)
        self.proj = _linear(c, c, ("heads", "embed"), rngs, std=std, dtype=dtype)

    def __call__(self, x: jax.Array, text: TextContext) -> jax.Array:
        b, l, _ = x.shape
        t = text.kv.shape[1]
        q = self.mat_q(x).reshape(b, l, self.heads, self.head_dim)
        k, v = fused_projection(text.kv.astype(self.dtype), self.mat_kv[...].astype(self.dtype))
        k = k.reshape(b, t, self.heads, self.head_dim)
        v = (v + self.v_bias[...].astype(self.dtype)).reshape(b, t, self.heads, self.head_dim)
        out = attend(q, k, v, key_mask=text.mask, scale=1.0 / math.sqrt(self.head_dim), impl=self.impl)
        return self.proj(out.reshape(b, l, -1)).astype(jnp.float32)


class FFN(nnx.Module):
    """fc1 (C -> F) -> GELU(tanh) -> fc2 (F -> C)."""

    def __init__(self, cfg, rngs: nnx.Rngs, *, std: float, dtype):
        self.fc1 = _linear(cfg.embed_dim, cfg.mlp_dim, ("embed", "mlp"), rngs, std=std, dtype=dtype)
        self.fc2 = _linear(cfg.mlp_dim, cfg.embed_dim, ("mlp", "embed"), rngs, std=std, dtype=dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.fc2(jax.nn.gelu(self.fc1(x), approximate=True)).astype(jnp.float32)


Attention = Callable[[jax.Array, jax.Array, jax.Array], tuple[jax.Array, object]]


class CrossAttnBlock(nnx.Module):
    """One transformer block (official `CrossAttnBlock`, shared AdaLN + per-block `ada_gss`)."""

    def __init__(self, cfg, rngs: nnx.Rngs, *, std: float, dtype):
        self.eps = cfg.norm_eps
        self.ada_gss = _param(_normal(1.0 / math.sqrt(cfg.embed_dim)), (NUM_ADA, cfg.embed_dim),
                              ("unmodeled", "norm"), rngs)
        self.sa = SelfAttention(cfg, rngs, std=std, dtype=dtype)
        self.ca = CrossAttention(cfg, rngs, std=std, dtype=dtype, impl=cfg.attention_impl)
        self.ca_norm = AffineLayerNorm(cfg.embed_dim, cfg.norm_eps)
        self.ffn = FFN(cfg, rngs, std=std, dtype=dtype)

    def __call__(self, x: jax.Array, text: TextContext, cos: jax.Array, sin: jax.Array, attention: Attention,
                 drop_rate: jax.Array | float = 0.0, key: jax.Array | None = None) -> tuple[jax.Array, object]:
        """x (B, Lq, C) float32 -> (x, whatever `attention` returns besides its output)."""
        gss = text.ada + self.ada_gss[...]  # (B, 6, C)
        gamma1, gamma2, scale1, scale2, shift1, shift2 = (gss[:, i, None, :] for i in range(NUM_ADA))
        keys = (None, None) if key is None else tuple(jax.random.split(key))
        h = layer_norm(x, self.eps) * (1.0 + scale1) + shift1
        q, k, v = self.sa.qkv(h, cos, sin)
        out, aux = attention(q, k, v)
        b, l = out.shape[:2]
        x = x + drop_path(self.sa.proj(out.reshape(b, l, -1)).astype(jnp.float32) * gamma1, drop_rate, keys[0])
        x = x + self.ca(self.ca_norm(x), text)
        h = layer_norm(x, self.eps) * (1.0 + scale2) + shift2
        x = x + drop_path(self.ffn(h) * gamma2, drop_rate, keys[1])
        return x, aux


class AdaLNBeforeHead(nnx.Module):
    """`head_nm`: scale, shift = Linear(SiLU(cond)) (this order); LN(x) (1 + scale) + shift. float32."""

    def __init__(self, cfg, rngs: nnx.Rngs, *, std: float):
        self.eps = cfg.norm_eps
        self.ada_lin = _param(_normal(std * cfg.aln_init), (cfg.embed_dim, 2, cfg.embed_dim),
                              ("embed", "unmodeled", "norm"), rngs)
        self.ada_bias = _param(nnx.initializers.zeros_init(), (2, cfg.embed_dim), ("unmodeled", "norm"), rngs)

    def __call__(self, x: jax.Array, cond: jax.Array) -> jax.Array:
        ss = jnp.einsum("bc,cjd->bjd", jax.nn.silu(cond), self.ada_lin[...]) + self.ada_bias[...]
        return layer_norm(x, self.eps) * (1.0 + ss[:, None, 0]) + ss[:, None, 1]


# ------------------------------------------------------------------------------------------------------ the model
class Infinity(nnx.Module):
    """The Infinity / VAREdit transformer. `Infinity(config.model, rngs=nnx.Rngs(0))`."""

    def __init__(self, cfg: ml_collections.ConfigDict, *, rngs: nnx.Rngs):
        validate_config(cfg)
        self.cfg = cfg = ml_collections.FrozenConfigDict(cfg)
        c, ct = cfg.embed_dim, cfg.text_dim
        std = cfg.init_std if cfg.init_std > 0 else math.sqrt(1.0 / c / 3.0)
        dtype = jnp.dtype(cfg.dtype)
        self.dtype = dtype
        self.head_dim = c // cfg.num_heads
        # text path
        self.cfg_uncond = logical_param(
            jax.random.truncated_normal(rngs.params(), -2.0 / 1.2, 2.0 / 1.2, (cfg.text_max_len, ct)) * 1.2
            / math.sqrt(ct), ("unmodeled", "text_embed"))
        self.text_norm = RMSNorm(ct, cfg.norm_eps, ("text_embed",))
        self.text_proj_for_sos = TextAttentivePool(ct, c, cfg.text_pool_heads, rngs, std=std)
        self.text_proj_for_ca = nnx.List([_linear(ct, c, ("text_embed", "mlp"), rngs, std=std),
                                          _linear(c, c, ("mlp", "embed"), rngs, std=std)])
        self.shared_ada_lin = _param(_normal(std), (c, NUM_ADA, c), ("embed", "unmodeled", "norm"), rngs)
        self.shared_ada_bias = _param(nnx.initializers.zeros_init(), (NUM_ADA, c), ("unmodeled", "norm"), rngs)
        # tokens
        self.pos_start = _param(_normal(std), (c,), ("embed",), rngs)
        self.lvl_embed = nnx.Embed(cfg.num_levels, c, rngs=rngs,
                                   embedding_init=logical_init(_normal(std), ("unmodeled", "embed")))
        self.word_embed = _linear(cfg.bits, c, ("bits", "embed"), rngs, std=std)
        # blocks
        proj_scale = 1.0 / math.sqrt(2 * cfg.depth)

        def make_block(r: nnx.Rngs) -> CrossAttnBlock:
            block = CrossAttnBlock(cfg, r, std=std, dtype=dtype)
            for lin in (block.sa.proj, block.ca.proj, block.ffn.fc2):
                lin.kernel[...] = lin.kernel[...] * proj_scale
            gss = block.ada_gss[...]
            block.ada_gss[...] = jnp.concatenate([gss[:2] * cfg.aln_gamma_init, gss[2:] * cfg.aln_init])
            return block

        if cfg.scan_layers:
            make = nnx.split_rngs(splits=cfg.depth)(
                nnx.vmap(make_block, in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"}))
            self.blocks = make(rngs)
        else:
            self.blocks = nnx.List([make_block(rngs) for _ in range(cfg.depth)])
        # head
        self.head_nm = AdaLNBeforeHead(cfg, rngs, std=std)
        self.head = _linear(c, 2 * cfg.bits, ("embed", "vocab"), rngs, std=std * cfg.head_init_scale)

    # ---------------------------------------------------------------------------------------------- text / tokens
    def encode_text(self, text: jax.Array, text_mask: jax.Array, drop_text: jax.Array) -> TextContext:
        """text (B, T, Ct), text_mask (B, T) bool, drop_text (B,) bool -> TextContext (float32).

        Dropped samples get `cfg_uncond[i]` as their i-th valid token (official `cfg_uncond[:len]`).
        """
        b, t, _ = text.shape
        if t > self.cfg.text_max_len:
            raise ValueError(f"text length {t} exceeds text_max_len {self.cfg.text_max_len}")
        mask = text_mask.astype(bool)
        index = jnp.clip(jnp.cumsum(mask, axis=1) - 1, 0, self.cfg.text_max_len - 1)
        uncond = self.cfg_uncond[...][index]
        text = jnp.where((drop_text.astype(bool)[:, None] & mask)[..., None], uncond, text.astype(jnp.float32))
        text = self.text_norm(jnp.where(mask[..., None], text, 0.0))
        cond = self.text_proj_for_sos(text, mask)
        kv = self.text_proj_for_ca[1](jax.nn.gelu(self.text_proj_for_ca[0](text), approximate=True))
        ada = jnp.einsum("bc,cjd->bjd", jax.nn.silu(cond), self.shared_ada_lin[...]) + self.shared_ada_bias[...]
        return TextContext(cond=cond, ada=ada, kv=kv, mask=mask)

    def embed(self, layout: SequenceLayout, rows: slice, text: TextContext, source: jax.Array | None,
              targets: jax.Array | None) -> jax.Array:
        """Input tokens (B, len(rows), C) float32 of sequence rows `rows` (a run of whole segments).

        source: (B, h_K, w_K, d) grid (needed when rows include source rows); targets: (B, n, d) next-scale inputs
        of the target rows in `rows` other than the SOS.
        """
        parts = []
        sos_row = layout.n_source
        if rows.start < layout.n_source:
            src = conditioning.source_segments(layout, source)[:, rows.start:min(rows.stop, layout.n_source)]
            parts.append(self.word_embed(src))
        if rows.start <= sos_row < rows.stop:
            parts.append((text.cond + self.pos_start[...])[:, None, :])
        if rows.stop > sos_row + 1:
            n = rows.stop - max(rows.start, sos_row + 1)
            if targets is None or targets.shape[1] != n:
                raise ValueError(f"expected target inputs of {n} tokens, got "
                                 f"{None if targets is None else targets.shape}")
            parts.append(self.word_embed(targets.astype(jnp.float32)))
        elif targets is not None:
            raise ValueError("target inputs given for rows that hold none (the SOS comes from the text)")
        x = jnp.concatenate(parts, axis=1) if len(parts) > 1 else parts[0]
        return x + self.lvl_embed(jnp.asarray(layout.level[rows]))[None]

    def logits(self, h: jax.Array, text: TextContext) -> jax.Array:
        """Head: hidden (B, L, C) -> logits (B, L, 2d), float32."""
        return self.head(self.head_nm(h, text.cond))

    # ---------------------------------------------------------------------------------------------- blocks
    def _remat(self, fn):
        if self.cfg.remat == "none":
            return fn
        policy = None if self.cfg.remat == "full" else getattr(jax.checkpoint_policies, self.cfg.remat)
        return jax.checkpoint(fn, policy=policy)

    def _block_states(self):
        """(graphdef of a block, state of block 0, states of blocks 1..: stacked along axis 0 or a list)."""
        if self.cfg.scan_layers:
            graphdef, state = nnx.split(self.blocks)
            return graphdef, jax.tree.map(lambda a: a[0], state), jax.tree.map(lambda a: a[1:], state)
        return nnx.graphdef(self.blocks[0]), nnx.state(self.blocks[0]), [nnx.state(b) for b in self.blocks[1:]]

    def run_blocks(self, x: jax.Array, text: TextContext, layout: SequenceLayout, rows: slice,
                   first_store: tuple | None = None, stores: tuple | None = None, *, collect: bool = False,
                   dropout_key: jax.Array | None = None):
        """Runs sequence rows `rows` (x (B, len(rows), C)) through every block.

        Without stores (teacher forcing) `rows` must be the whole sequence. With stores (KV-cached decoding:
        block 0's (K, V) and the other blocks' stacked (K, V), updated in place: the scan carries them) the rows'
        keys/values are written into them.
        Returns (x, (first_store, stores), block outputs (depth, B, len(rows), C) when `collect`, else None).
        """
        cfg = self.cfg
        cos, sin = rope.cos_sin(layout.positions[rows], self.head_dim)
        first_attn = _attention(layout, layout.first_mask, rows, pooled=True, impl=cfg.attention_impl)
        rest_attn = _attention(layout, layout.mask, rows, pooled=False, impl=cfg.attention_impl)
        rates = np.linspace(0.0, cfg.drop_path_rate, cfg.depth, dtype=np.float32)  # official linspace over blocks
        keys = None if dropout_key is None or cfg.drop_path_rate <= 0 else jax.random.split(dropout_key, cfg.depth)
        graphdef, first_state, rest_state = self._block_states()

        def block_fn(attention):
            def fn(state, x, text, store, rate, key):
                return nnx.merge(graphdef, state)(x, text, cos, sin, attention(store), rate, key)
            return self._remat(fn)

        x, first_store = block_fn(first_attn)(first_state, x, text, first_store, rates[0],
                                              None if keys is None else keys[0])
        outs = [x]
        rest_fn = block_fn(rest_attn)
        if cfg.scan_layers and cfg.depth > 1:
            def body(carry, xs):
                x, stores = carry
                state, rate, key, i = xs
                x, stores = rest_fn(state, x, text, None if stores is None else (*stores, i), rate, key)
                return (x, stores), (x if collect else None)
            (x, stores), ys = jax.lax.scan(body, (x, stores), (rest_state, jnp.asarray(rates[1:]),
                                                               None if keys is None else keys[1:],
                                                               jnp.arange(cfg.depth - 1)))
            outs = [outs[0], *ys] if collect else outs
        elif cfg.depth > 1:
            for i, state in enumerate(rest_state, start=1):
                store = None if stores is None else (*stores, i - 1)  # the stacked stores and this block's layer
                x, new = rest_fn(state, x, text, store, rates[i], None if keys is None else keys[i])
                stores = stores if new is None else new
                outs.append(x)
        return x, (first_store, stores), (jnp.stack(outs) if collect else None)

    # ---------------------------------------------------------------------------------------------- entry points
    def __call__(self, text: jax.Array, text_mask: jax.Array, drop_text: jax.Array, source: jax.Array | None,
                 targets: jax.Array, layout: SequenceLayout, *, return_blocks: bool = False,
                 dropout_key: jax.Array | None = None):
        """Teacher-forcing forward -> logits (B, L_tgt, 2d) [, block outputs (depth, B, L, C)].

        text (B, T, Ct), text_mask (B, T), drop_text (B,) bool; source (B, h_K, w_K, d) or None (plain
        Infinity); targets (B, L_tgt - 1, d) next-scale inputs; `dropout_key` enables drop path (training).
        """
        _check_source(layout, source)
        ctx = self.encode_text(text, text_mask, drop_text)
        rows = slice(0, layout.length)
        x = self.embed(layout, rows, ctx, source, targets)
        x, _, blocks = self.run_blocks(x, ctx, layout, rows, collect=return_blocks, dropout_key=dropout_key)
        logits = self.logits(x[:, layout.n_source:], ctx)
        return (logits, blocks) if return_blocks else logits

    def init_decode(self, text: jax.Array, text_mask: jax.Array, drop_text: jax.Array, source: jax.Array | None,
                    layout: SequenceLayout) -> DecodeState:
        """Text path + the source rows through every block -> a DecodeState with static-shape K/V stores.

        For CFG pass the batch as [cond rows; uncond rows] (drop_text True on the uncond rows) with the source
        tiled to match.
        """
        _check_source(layout, source)
        ctx = self.encode_text(text, text_mask, drop_text)
        b = ctx.cond.shape[0]
        shape = (b, layout.length, self.cfg.num_heads, self.head_dim)
        first = tuple(jnp.zeros((b, layout.n_pooled + layout.length) + shape[2:], self.dtype) for _ in range(2))
        rest = tuple(jnp.zeros((self.cfg.depth - 1,) + shape, self.dtype) for _ in range(2))
        if layout.n_source:
            rows = layout.source_slice
            x = self.embed(layout, rows, ctx, source, None)
            _, (first, rest), _ = self.run_blocks(x, ctx, layout, rows, first, rest)
        return DecodeState(text=ctx, first_k=first[0], first_v=first[1], k=rest[0], v=rest[1])

    def decode_scale(self, state: DecodeState, layout: SequenceLayout, scale: int,
                     tokens: jax.Array | None = None) -> tuple[jax.Array, DecodeState]:
        """Runs target scale `scale` -> (logits (B, h*w, 2d), new state). tokens (B, h*w, d): the scale's
        next-scale inputs (None for scale 0, the SOS). Scales must run in order 0, 1, ..."""
        rows = layout.target_slice(scale)
        x = self.embed(layout, rows, state.text, None, tokens)
        first, rest = (state.first_k, state.first_v), (state.k, state.v)
        x, (first, rest), _ = self.run_blocks(x, state.text, layout, rows, first, rest)
        new = DecodeState(text=state.text, first_k=first[0], first_v=first[1], k=rest[0], v=rest[1])
        return self.logits(x, state.text), new


def _check_source(layout: SequenceLayout, source: jax.Array | None) -> None:
    if (source is None) != (layout.source_grid is None):
        raise ValueError(f"conditioning {layout.conditioning!r} takes {'a' if layout.source_grid else 'no'} source")


def _attention(layout: SequenceLayout, mask, rows: slice, *, pooled: bool, impl: str):
    """attention(store) -> callable(q, k, v) -> (out, new store) for query rows `rows` under `mask`.

    The key/value sequence is [pooled source (block 0 of SAR) | sequence]. store=None: teacher forcing (rows =
    the whole sequence; the keys are this call's own). Otherwise store = (K, V) of the full key sequence, or
    (K, V, layer) with K, V stacked over layers: the rows' keys/values (and, when the rows contain the source,
    SAR's pooled ones) are written first (in place: only those rows), then the keys the rows see are read.
    """
    n_pooled = layout.n_pooled if pooled else 0
    runs = mask.visible_runs(rows)
    sub_mask = mask.restrict(rows, runs)
    with_pool = n_pooled > 0 and rows.start == 0 and rows.stop >= layout.n_source

    def gather(a):
        parts = [a[:, lo:hi] for lo, hi in runs]
        return parts[0] if len(parts) == 1 else jnp.concatenate(parts, axis=1)

    def make(store):
        def fn(q, k, v):
            if store is None:
                if (rows.start, rows.stop) != (0, layout.length):
                    raise ValueError("teacher forcing needs every row of the sequence")
                if with_pool:
                    src = layout.source_slice
                    k = jnp.concatenate([conditioning.pool_source(layout, k[:, src]), k], axis=1)
                    v = jnp.concatenate([conditioning.pool_source(layout, v[:, src]), v], axis=1)
                return attend(q, k, v.astype(q.dtype), sub_mask, scale=1.0, impl=impl), None
            keys, values, *layer = store
            writes = [(rows.start + n_pooled, k, v)]
            if with_pool:
                src = layout.source_slice
                writes.append((0, *(conditioning.pool_source(layout, a[:, src]) for a in (k, v))))
            for start, k_rows, v_rows in writes:
                keys, values = _write_rows(keys, k_rows, start, layer), _write_rows(values, v_rows, start, layer)
            read_k, read_v = (keys, values) if not layer else (keys[layer[0]], values[layer[0]])
            out = attend(q, gather(read_k), gather(read_v).astype(q.dtype), sub_mask, scale=1.0, impl=impl)
            return out, (keys, values)
        return fn
    return make


def _write_rows(store: jax.Array, rows: jax.Array, start: int, layer: list) -> jax.Array:
    """store (B, L, N, hd), or (layers, B, L, N, hd) with `layer` = [index]: rows (B, n, N, hd) written at
    sequence position `start` (of that layer), in place."""
    rows = rows.astype(store.dtype)
    if layer:
        return jax.lax.dynamic_update_slice(store, rows[None], (layer[0], 0, start, 0, 0))
    return jax.lax.dynamic_update_slice(store, rows, (0, start, 0, 0))


# ------------------------------------------------------------------------------------------------------ parameters
def build(model_cfg: ml_collections.ConfigDict, params: dict | None = None, *, seed: int = 0) -> Infinity:
    """An Infinity of `model_cfg`: random init (one jitted program) or, with `params`, their values."""
    if params is None:
        return nnx.jit(lambda: Infinity(model_cfg, rngs=nnx.Rngs(seed)))()
    model = nnx.eval_shape(lambda: Infinity(model_cfg, rngs=nnx.Rngs(seed)))
    load_param_dict(model, params)
    return model


DECAYED_WEIGHTS = ("kernel", "mat_qkv", "mat_kv", "shared_ada_lin", "ada_lin")


def weight_decay(path: tuple) -> bool:
    """Whether the official trainer decays the parameter at `path` (keys of `param_dict`): the matmul weights
    (Linear kernels and the fused projections); never biases, norms, embeddings, `cfg_uncond`, `pos_start`,
    `ada_gss`, `scale_mul` or the attentive pool's `mat_q` (the official param groups: 1-D tensors, biases and
    `NO_DECAY` names are not decayed)."""
    return path[-1] in DECAYED_WEIGHTS


# ------------------------------------------------------------------------------------------------------ loss
def token_weights(schedule: Sequence[tuple[int, int]], reweight_by_scale: bool) -> np.ndarray:
    """(L,) float32 per-token loss weights summing to 1: uniform 1/L, or (official `reweight_loss_by_scale`, with
    the corrected `np.array(schedule[-1]).prod()`) proportional to sqrt(h_K w_K) / sqrt(h_k w_k)."""
    sizes = np.array([h * w for h, w in schedule], np.float64)
    n = int(sizes.sum())
    if not reweight_by_scale:
        return np.full(n, 1.0 / n, np.float32)
    w = np.repeat(np.sqrt(sizes[-1]) / np.sqrt(sizes), sizes.astype(np.int64))
    return (w / w.sum()).astype(np.float32)


def bitwise_cross_entropy(logits: jax.Array, bits: jax.Array, label_smoothing: float = 0.0) -> jax.Array:
    """Per-bit CE (B, L, d), float32: logits (B, L, 2d) read as (B, L, d, 2) classes (bit 0, bit 1); torch
    CrossEntropyLoss(label_smoothing) semantics."""
    b, l, v = logits.shape
    logp = jax.nn.log_softmax(logits.astype(jnp.float32).reshape(b, l, v // 2, 2), axis=-1)
    target = jnp.take_along_axis(logp, bits.astype(jnp.int32)[..., None], axis=-1)[..., 0]
    return -(1.0 - label_smoothing) * target - label_smoothing * logp.mean(-1)


def bitwise_loss(logits: jax.Array, bits: jax.Array, schedule: Sequence[tuple[int, int]], *,
                 reweight_by_scale: bool = False, label_smoothing: float = 0.0) -> tuple[jax.Array, jax.Array]:
    """The official training loss: per-token mean of the per-bit CE, weighted by `token_weights`, summed over
    tokens, mean over the batch. Returns (loss (), per-bit CE (B, L, d))."""
    per_bit = bitwise_cross_entropy(logits, bits, label_smoothing)
    weights = jnp.asarray(token_weights(schedule, reweight_by_scale))
    return (per_bit.mean(-1) * weights).sum(-1).mean(), per_bit


def bit_accuracy(logits: jax.Array, bits: jax.Array) -> jax.Array:
    """(B, L, d) bool: the argmax bit equals the label."""
    b, l, v = logits.shape
    return jnp.argmax(logits.reshape(b, l, v // 2, 2), axis=-1) == bits.astype(jnp.int32)
