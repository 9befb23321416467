"""Pre-norm transformer encoders for the evaluation models: one ViT for CLIP's image tower and DINO, one encoder
stack shared with CLIP's text tower, in Flax NNX.

Block (both CLIP and DINO):   x += out(attention(norm1(x)));  x += fc2(act(fc1(norm2(x))))
  attention: separate query/key/value projections with bias, logits scaled by head_dim^-0.5, optional causal mask
  (CLIP text); softmax in float32; act "quick_gelu" (x * sigmoid(1.702 x), OpenAI CLIP) or "gelu" (exact erf, DINO).
ViT (`VisionTransformer`): patch conv (kernel = stride = patch, bias per config) -> [CLS | patches] + learned position
  embedding -> optional pre-norm (CLIP `pre_layrnorm`) -> blocks -> post norm (CLIP `post_layernorm` on CLS, DINO
  `norm`). Images are NHWC float32, already normalised by the model's own preprocessing; their grid must equal the
  position-embedding grid (no position interpolation).

Blocks are stacked along a leading "layers" axis (`nnx.vmap`) and run with `jax.lax.scan`; `Encoder.keys(x, layer)`
returns the key projection of one block's input, which DINO's structure distance needs. Matmuls run at HIGHEST
precision: these are metrics, not training.

Config fields (`encoder_config`): width, layers, heads, mlp_dim, act, eps, causal; the ViT adds image_size,
patch_size, channels, patch_bias, pre_norm.
"""
import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from varedit_jax.params import logical_init, logical_param

ACTIVATIONS = {"quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
               "gelu": lambda x: jax.nn.gelu(x, approximate=False)}
_HIGHEST = jax.lax.Precision.HIGHEST


def encoder_config(**fields) -> ml_collections.ConfigDict:
    """An encoder (or ViT, with the ViT fields) config; unknown fields raise, shapes are validated."""
    cfg = ml_collections.ConfigDict(dict(width=768, layers=12, heads=12, mlp_dim=3072, act="gelu", eps=1e-6,
                                         causal=False))
    vit = {"image_size", "patch_size", "channels", "patch_bias", "pre_norm"}
    if vit & set(fields):
        cfg.update(dict(image_size=224, patch_size=16, channels=3, patch_bias=True, pre_norm=False))
    unknown = sorted(set(fields) - set(cfg.keys()))
    if unknown:
        raise ValueError(f"unknown encoder config fields {unknown}")
    cfg.update(fields)
    validate(cfg)
    return cfg


def validate(cfg: ml_collections.ConfigDict) -> None:
    for name in ("width", "layers", "heads", "mlp_dim") + (("image_size", "patch_size", "channels")
                                                           if "patch_size" in cfg else ()):
        if not isinstance(cfg[name], int) or cfg[name] < 1:
            raise ValueError(f"encoder {name} must be a positive int, got {cfg[name]!r}")
    if cfg.width % cfg.heads:
        raise ValueError(f"width {cfg.width} is not divisible by heads {cfg.heads}")
    if cfg.act not in ACTIVATIONS:
        raise ValueError(f"unknown activation {cfg.act!r}; expected one of {sorted(ACTIVATIONS)}")
    if "patch_size" in cfg and cfg.image_size % cfg.patch_size:
        raise ValueError(f"image_size {cfg.image_size} is not a multiple of patch_size {cfg.patch_size}")


def _linear(din: int, dout: int, names: tuple[str, str], rngs: nnx.Rngs) -> nnx.Linear:
    """Linear with bias; kernel (din, dout) = PyTorch weight transposed."""
    return nnx.Linear(din, dout, param_dtype=jnp.float32, precision=_HIGHEST, rngs=rngs,
                      kernel_init=logical_init(nnx.initializers.normal(din ** -0.5), names),
                      bias_init=logical_init(nnx.initializers.zeros_init(), names[1:]))


def layer_norm(dim: int, eps: float, rngs: nnx.Rngs) -> nnx.LayerNorm:
    return nnx.LayerNorm(dim, epsilon=eps, param_dtype=jnp.float32, rngs=rngs,
                         scale_init=logical_init(nnx.initializers.ones_init(), ("norm",)),
                         bias_init=logical_init(nnx.initializers.zeros_init(), ("norm",)))


class Attention(nnx.Module):
    """Multi-head self-attention with separate biased query/key/value/out projections."""

    def __init__(self, cfg: ml_collections.ConfigDict, rngs: nnx.Rngs):
        self.heads, self.causal = cfg.heads, cfg.causal
        self.query = _linear(cfg.width, cfg.width, ("embed", "heads"), rngs)
        self.key = _linear(cfg.width, cfg.width, ("embed", "heads"), rngs)
        self.value = _linear(cfg.width, cfg.width, ("embed", "heads"), rngs)
        self.out = _linear(cfg.width, cfg.width, ("heads", "embed"), rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        """x (B, T, C) -> (B, T, C)."""
        b, t, c = x.shape
        split = lambda y: y.reshape(b, t, self.heads, c // self.heads)  # noqa: E731
        q, k, v = split(self.query(x)), split(self.key(x)), split(self.value(x))
        logits = jnp.einsum("bqnd,bknd->bnqk", q, k, precision=_HIGHEST) * (c // self.heads) ** -0.5
        if self.causal:
            logits = jnp.where(jnp.tril(jnp.ones((t, t), bool)), logits, jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
        return self.out(jnp.einsum("bnqk,bknd->bqnd", probs, v, precision=_HIGHEST).reshape(b, t, c))


class Mlp(nnx.Module):
    def __init__(self, cfg: ml_collections.ConfigDict, rngs: nnx.Rngs):
        self.act = ACTIVATIONS[cfg.act]
        self.fc1 = _linear(cfg.width, cfg.mlp_dim, ("embed", "mlp"), rngs)
        self.fc2 = _linear(cfg.mlp_dim, cfg.width, ("mlp", "embed"), rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.fc2(self.act(self.fc1(x)))


class Block(nnx.Module):
    """Pre-norm residual block: attention then MLP."""

    def __init__(self, cfg: ml_collections.ConfigDict, rngs: nnx.Rngs):
        self.norm1 = layer_norm(cfg.width, cfg.eps, rngs)
        self.attn = Attention(cfg, rngs)
        self.norm2 = layer_norm(cfg.width, cfg.eps, rngs)
        self.mlp = Mlp(cfg, rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class Encoder(nnx.Module):
    """`cfg.layers` stacked blocks. Parameters: blocks.* with a leading (layers,) axis."""

    def __init__(self, cfg: ml_collections.ConfigDict, rngs: nnx.Rngs):
        self.num_layers = cfg.layers
        make = nnx.split_rngs(splits=cfg.layers)(
            nnx.vmap(lambda r: Block(cfg, r), in_axes=(0,), out_axes=0,
                     transform_metadata={nnx.PARTITION_NAME: "layers"}))
        self.blocks = make(rngs)

    def _run(self, x: jax.Array, state) -> jax.Array:
        graphdef = nnx.graphdef(self.blocks)

        def body(h, layer_state):
            return nnx.merge(graphdef, layer_state)(h), None

        return jax.lax.scan(body, x, state)[0]

    def __call__(self, x: jax.Array) -> jax.Array:
        """x (B, T, C) float32 -> output of the last block (B, T, C)."""
        return self._run(x, nnx.state(self.blocks))

    def keys(self, x: jax.Array, layer: int) -> jax.Array:
        """Keys (B, T, C) (heads concatenated, head-major) that block `layer` computes from the encoder input x."""
        if not 0 <= layer < self.num_layers:
            raise ValueError(f"layer {layer} out of range for {self.num_layers} blocks")
        state = nnx.state(self.blocks)
        h = self._run(x, jax.tree.map(lambda a: a[:layer], state))
        block = nnx.merge(nnx.graphdef(self.blocks), jax.tree.map(lambda a: a[layer], state))
        return block.attn.key(block.norm1(h))


class VisionTransformer(nnx.Module):
    """ViT image tower. `__call__(pixels)` -> pooled CLS (B, C) after the post norm; `hidden(pixels)` -> encoder
    input tokens (B, 1 + N, C); `keys(pixels, layer)` -> block `layer`'s keys (B, 1 + N, C).

    Parameters: patch.kernel (p, p, channels, C) [+ patch.bias], cls_token (C,), position_embedding (1 + N, C),
    [pre_norm], encoder.blocks.*, post_norm.
    """

    def __init__(self, cfg: ml_collections.ConfigDict, *, rngs: nnx.Rngs):
        validate(cfg)
        self.cfg = cfg = ml_collections.FrozenConfigDict(cfg)
        c, p = cfg.width, cfg.patch_size
        self.grid = cfg.image_size // p
        self.patch = nnx.Conv(cfg.channels, c, (p, p), strides=(p, p), padding="VALID", use_bias=cfg.patch_bias,
                              param_dtype=jnp.float32, precision=_HIGHEST, rngs=rngs,
                              kernel_init=logical_init(nnx.initializers.lecun_normal(),
                                                                ("conv_h", "conv_w", "conv_in", "embed")),
                              bias_init=logical_init(nnx.initializers.zeros_init(), ("embed",)))
        init = nnx.initializers.normal(0.02)
        self.cls_token = logical_param(init(rngs.params(), (c,), jnp.float32), ("embed",))
        self.position_embedding = logical_param(init(rngs.params(), (self.grid ** 2 + 1, c), jnp.float32), ("unmodeled", "embed"))
        self.pre_norm = layer_norm(c, cfg.eps, rngs) if cfg.pre_norm else None
        self.encoder = Encoder(cfg, rngs)
        self.post_norm = layer_norm(c, cfg.eps, rngs)

    def hidden(self, pixels: jax.Array) -> jax.Array:
        """pixels (B, H, W, channels) normalised -> tokens (B, 1 + N, C) entering the first block."""
        b, h, w, _ = pixels.shape
        if (h, w) != (self.cfg.image_size, self.cfg.image_size):
            raise ValueError(f"this ViT takes {self.cfg.image_size}x{self.cfg.image_size} inputs (its position "
                             f"embedding grid), got {h}x{w}")
        patches = self.patch(pixels.astype(jnp.float32)).reshape(b, self.grid ** 2, self.cfg.width)
        cls = jnp.broadcast_to(self.cls_token[...], (b, 1, self.cfg.width))
        x = jnp.concatenate([cls, patches], axis=1) + self.position_embedding[...][None]
        return self.pre_norm(x) if self.pre_norm is not None else x

    def __call__(self, pixels: jax.Array) -> jax.Array:
        return self.post_norm(self.encoder(self.hidden(pixels))[:, 0])

    def keys(self, pixels: jax.Array, layer: int) -> jax.Array:
        return self.encoder.keys(self.hidden(pixels), layer)
