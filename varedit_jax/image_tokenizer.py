"""The image tokenizer: the BSQ autoencoder of Infinity (official `flux_vqgan.AutoEncoder`), in Flax NNX.

A Flux/SD-style convolutional encoder and decoder around the multi-scale binary spherical quantizer of
`varedit_jax.quantizer` (no attention blocks, no learnable quantizer parameters). Released families:
  d32 (Infinity-2B / VAREdit-2B): base_ch 128, ch_mult (1, 2, 4, 4, 4), stride 16, d = 32.
  d56 (Infinity-8B / VAREdit-8B): base_ch 128, ch_mult (1, 2, 4, 4), stride 8, d = 14, with the 2x2 spatial
      patchify on the transformer side (tokens of 4d = 56 channels, transformer stride 16).

Layouts: images (B, H, W, 3) float32 in [-1, 1]; features / latents (B, H/p, W/p, d), p = `patch_size`.
Schedules given to this class are TRANSFORMER schedules; the quantizer runs on `quantizer.vae_schedule`.

Architecture (`num_res_blocks` = n):
  ResnetBlock: h = conv1(swish(norm1(x))); h = conv2(swish(norm2(h))); out = nin_shortcut(x) + h (1x1 conv only
    when the width changes). Norm = GroupNorm(32 groups, 24 if C % 32 != 0, eps 1e-6), swish = x * sigmoid(x).
  Downsample: zero-pad right/bottom by 1, 3x3 conv stride 2 (no other padding). Upsample: nearest x2, 3x3 conv.
  Encoder: conv_in -> levels i (n blocks to base_ch * ch_mult[i], Downsample if i < log2 p) -> mid.block_1,
    mid.block_2 -> norm_out -> swish -> conv_out (to d). Output = raw features (no normalisation).
  Decoder: conv_in (d -> base_ch * ch_mult[-1]) -> mid -> levels i = last..0 (n + 1 blocks, Upsample if
    1 <= i <= log2 p) -> norm_out -> swish -> conv_out (to 3). `up[i]` is indexed by resolution level.
Parameter names mirror the official modules (`encoder.down[i].block[j].conv1.kernel` <-> official
`encoder.down.i.block.j.conv1.conv.weight`); kernels are HWIO with logical axes (conv_h, conv_w, conv_in, conv_out).
"""
import dataclasses
import math

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from varedit_jax import quantizer
from varedit_jax.params import load_param_dict, logical_init
from varedit_jax.params import param_dict  # noqa: F401  (re-exported: image_tokenizer.param_dict)

KIND = "image_tokenizer"  # the `kind` of its stored configs
NORM_EPS = 1e-6
_PRECISIONS = {"highest": jax.lax.Precision.HIGHEST, "default": jax.lax.Precision.DEFAULT}


def norm_groups(channels: int, groups: int = 0) -> int:
    """GroupNorm groups: `groups` if non-zero, else the official `Normalize` rule (32, or 24 when C % 32 != 0)."""
    if groups:
        if channels % groups:
            raise ValueError(f"GroupNorm width {channels} is not divisible by norm_groups={groups}")
        return groups
    for groups in (32, 24):
        if channels % groups == 0:
            return groups
    raise ValueError(f"GroupNorm width {channels} is divisible by neither 32 nor 24 (official Normalize)")


def num_downsamples(patch_size: int) -> int:
    """log2 of the tokenizer's spatial stride."""
    n = int(round(math.log2(patch_size)))
    if 2 ** n != patch_size:
        raise ValueError(f"patch_size must be a power of 2, got {patch_size}")
    return n


REQUIRED_FIELDS = ("base_ch", "ch_mult", "num_res_blocks", "patch_size", "codebook_dim")
OPTIONAL_FIELDS = {"patchify": False, "precision": "highest", "norm_groups": 0}


def model_config(cfg) -> ml_collections.FrozenConfigDict:
    """The complete, validated, immutable model config (optional fields filled with their defaults)."""
    cfg = dict(cfg)
    missing = [f for f in REQUIRED_FIELDS if f not in cfg]
    unknown = sorted(set(cfg) - set(REQUIRED_FIELDS) - set(OPTIONAL_FIELDS))
    if missing or unknown:
        raise ValueError(f"tokenizer config: missing fields {missing}, unknown fields {unknown}")
    cfg = {**OPTIONAL_FIELDS, **cfg, "ch_mult": tuple(int(m) for m in cfg["ch_mult"]),
           "patchify": bool(cfg.get("patchify", False))}
    frozen = ml_collections.FrozenConfigDict(cfg)
    validate_config(frozen)
    return frozen


def validate_config(cfg: ml_collections.ConfigDict) -> None:
    """Raises ValueError for architectures the official class cannot build."""
    if cfg.precision not in _PRECISIONS:
        raise ValueError(f"precision must be one of {sorted(_PRECISIONS)}, got {cfg.precision!r}")
    n_down = num_downsamples(cfg.patch_size)
    if len(cfg.ch_mult) < n_down + 1:
        raise ValueError(f"patch_size {cfg.patch_size} needs at least {n_down + 1} levels, "
                         f"ch_mult={tuple(cfg.ch_mult)}")
    for width in {cfg.base_ch * m for m in cfg.ch_mult}:
        norm_groups(width, cfg.norm_groups)
    if cfg.codebook_dim < 1 or cfg.num_res_blocks < 1:
        raise ValueError("codebook_dim and num_res_blocks must be positive")


def swish(x: jax.Array) -> jax.Array:
    return x * jax.nn.sigmoid(x)


@dataclasses.dataclass(frozen=True)
class Layers:
    """Builds the convolutions and norms of one model (shared precision and GroupNorm groups)."""
    precision: jax.lax.Precision
    groups: int

    @classmethod
    def of(cls, cfg: ml_collections.ConfigDict) -> "Layers":
        return cls(_PRECISIONS[cfg.precision], cfg.norm_groups)

    def conv(self, c_in: int, c_out: int, kernel: int, rngs: nnx.Rngs, *, strides: int = 1,
             padding="SAME") -> nnx.Conv:
        """Conv with the PyTorch default kernel init scale (U(+-1/sqrt(fan_in))), zero bias, logical axis names."""
        init = jax.nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")
        return nnx.Conv(c_in, c_out, (kernel, kernel), strides=strides, padding=padding, precision=self.precision,
                        kernel_init=logical_init(init, ("conv_h", "conv_w", "conv_in", "conv_out")),
                        bias_init=logical_init(nnx.initializers.zeros_init(), ("conv_out",)), rngs=rngs)

    def norm(self, channels: int, rngs: nnx.Rngs) -> nnx.GroupNorm:
        return nnx.GroupNorm(channels, num_groups=norm_groups(channels, self.groups), epsilon=NORM_EPS,
                             use_fast_variance=False,
                             scale_init=logical_init(nnx.initializers.ones_init(), ("norm",)),
                             bias_init=logical_init(nnx.initializers.zeros_init(), ("norm",)), rngs=rngs)


class ResnetBlock(nnx.Module):
    def __init__(self, c_in: int, c_out: int, make: Layers, *, rngs: nnx.Rngs):
        self.norm1 = make.norm(c_in, rngs)
        self.conv1 = make.conv(c_in, c_out, 3, rngs)
        self.norm2 = make.norm(c_out, rngs)
        self.conv2 = make.conv(c_out, c_out, 3, rngs)
        self.nin_shortcut = make.conv(c_in, c_out, 1, rngs) if c_in != c_out else None

    def __call__(self, x: jax.Array) -> jax.Array:
        h = self.conv1(swish(self.norm1(x)))
        h = self.conv2(swish(self.norm2(h)))
        return (x if self.nin_shortcut is None else self.nin_shortcut(x)) + h


class Downsample(nnx.Module):
    """Zero-pad right and bottom by one, then a 3x3 conv with stride 2 (official asymmetric padding)."""

    def __init__(self, channels: int, make: Layers, *, rngs: nnx.Rngs):
        self.conv = make.conv(channels, channels, 3, rngs, strides=2, padding=((0, 1), (0, 1)))

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.conv(x)


class Upsample(nnx.Module):
    """Nearest-neighbour x2, then a 3x3 conv."""

    def __init__(self, channels: int, make: Layers, *, rngs: nnx.Rngs):
        self.conv = make.conv(channels, channels, 3, rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.conv(jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2))


class Level(nnx.Module):
    """One resolution level: ResnetBlocks, then an optional resampling (Downsample in the encoder, Upsample in the
    decoder; the attribute names are the official ones)."""

    def __init__(self, c_in: int, c_out: int, n_blocks: int, resample: str | None, make: Layers, *, rngs: nnx.Rngs):
        self.block = nnx.List([ResnetBlock(c_in if j == 0 else c_out, c_out, make, rngs=rngs)
                               for j in range(n_blocks)])
        self.downsample = Downsample(c_out, make, rngs=rngs) if resample == "down" else None
        self.upsample = Upsample(c_out, make, rngs=rngs) if resample == "up" else None

    def __call__(self, x: jax.Array) -> jax.Array:
        for block in self.block:
            x = block(x)
        if self.downsample is not None:
            x = self.downsample(x)
        if self.upsample is not None:
            x = self.upsample(x)
        return x


class Mid(nnx.Module):
    def __init__(self, channels: int, make: Layers, *, rngs: nnx.Rngs):
        self.block_1 = ResnetBlock(channels, channels, make, rngs=rngs)
        self.block_2 = ResnetBlock(channels, channels, make, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.block_2(self.block_1(x))


class Encoder(nnx.Module):
    """(B, H, W, 3) images -> (B, H/p, W/p, d) raw features."""

    def __init__(self, cfg: ml_collections.ConfigDict, *, rngs: nnx.Rngs):
        make = Layers.of(cfg)
        widths = [cfg.base_ch * m for m in cfg.ch_mult]
        n_down = num_downsamples(cfg.patch_size)
        self.conv_in = make.conv(3, cfg.base_ch, 3, rngs)
        self.down = nnx.List([
            Level(([cfg.base_ch] + widths)[i], widths[i], cfg.num_res_blocks, "down" if i < n_down else None,
                  make, rngs=rngs) for i in range(len(widths))])
        self.mid = Mid(widths[-1], make, rngs=rngs)
        self.norm_out = make.norm(widths[-1], rngs)
        self.conv_out = make.conv(widths[-1], cfg.codebook_dim, 3, rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        h = self.conv_in(x)
        for level in self.down:
            h = level(h)
        return self.conv_out(swish(self.norm_out(self.mid(h))))


class Decoder(nnx.Module):
    """(B, h, w, d) latent -> (B, h*p, w*p, 3) images (not clamped)."""

    def __init__(self, cfg: ml_collections.ConfigDict, *, rngs: nnx.Rngs):
        make = Layers.of(cfg)
        widths = [cfg.base_ch * m for m in cfg.ch_mult]
        n_down = num_downsamples(cfg.patch_size)
        self.conv_in = make.conv(cfg.codebook_dim, widths[-1], 3, rngs)
        self.mid = Mid(widths[-1], make, rngs=rngs)
        c_in = (widths + [widths[-1]])[1:]  # level i starts at the width of level i + 1 (the last: its own)
        self.up = nnx.List([
            Level(c_in[i], widths[i], cfg.num_res_blocks + 1, "up" if 1 <= i <= n_down else None, make, rngs=rngs)
            for i in range(len(widths))])
        self.norm_out = make.norm(widths[0], rngs)
        self.conv_out = make.conv(widths[0], 3, 3, rngs)

    def __call__(self, z: jax.Array) -> jax.Array:
        h = self.mid(self.conv_in(z))
        for level in reversed(self.up):
            h = level(h)
        return self.conv_out(swish(self.norm_out(h)))


class ImageTokenizer(nnx.Module):
    """The image tokenizer: `encode` (raw features), `quantize` (multi-scale BSQ), `decode` (clamped), `decode_from_bits`.

    config: the model sub-config with base_ch, ch_mult, num_res_blocks, patch_size, codebook_dim, patchify,
      precision ('highest' keeps fp32 convolutions on TPU, 'default' lets the backend pick) and norm_groups
      (0 = the official rule; the toy config sets fewer groups so that each group holds several channels).
    """

    def __init__(self, config: ml_collections.ConfigDict, *, rngs: nnx.Rngs):
        config = model_config(config)
        self.config = config
        self.encoder = Encoder(config, rngs=rngs)
        self.decoder = Decoder(config, rngs=rngs)

    @property
    def codebook_dim(self) -> int:
        return self.config.codebook_dim

    @property
    def patchify(self) -> bool:
        return bool(self.config.patchify)

    @property
    def stride(self) -> int:
        """Image pixels per transformer token side (patch_size, x2 with the 2x2 patchify)."""
        return self.config.patch_size * (2 if self.patchify else 1)

    def encode(self, images: jax.Array) -> jax.Array:
        """(B, H, W, 3) in [-1, 1] -> raw features (B, H/p, W/p, d) float32 (VAREdit's source features)."""
        p = self.config.patch_size
        if images.ndim != 4 or images.shape[-1] != 3 or images.shape[1] % p or images.shape[2] % p:
            raise ValueError(f"images must be (B, H, W, 3) with H, W multiples of {p}, got {images.shape}")
        return self.encoder(images.astype(jnp.float32))

    def quantize(self, features: jax.Array, schedule) -> quantizer.MultiScaleCodes:
        """Multi-scale BSQ (tokenizer path) over the VAE schedule of the transformer `schedule`."""
        return quantizer.encode_multiscale(features, quantizer.vae_schedule(schedule, self.patchify))

    def decode(self, latent: jax.Array) -> jax.Array:
        """(B, h, w, d) -> images (B, h*p, w*p, 3) clamped to [-1, 1]."""
        return jnp.clip(self.decoder(latent.astype(jnp.float32)), -1.0, 1.0)

    def decode_from_bits(self, bits: jax.Array, schedule) -> jax.Array:
        """Transformer-layout bits (B, L, D) of `schedule` -> images (official `decode_from_indices`)."""
        summed, _ = quantizer.infer_sequence(bits, schedule, patchify=self.patchify)
        return self.decode(summed)

    def __call__(self, images: jax.Array, schedule) -> tuple[jax.Array, quantizer.MultiScaleCodes, jax.Array]:
        """Training forward: (unclamped reconstruction, multi-scale codes, raw features)."""
        features = self.encode(images)
        codes = self.quantize(features, schedule)
        return self.decoder(codes.quantized), codes, features


def default_model_config(**overrides) -> ml_collections.ConfigDict:
    """A mutable model sub-config: the official d32 architecture unless overridden."""
    fields = {**dict(base_ch=128, ch_mult=(1, 2, 4, 4, 4), num_res_blocks=2, patch_size=16, codebook_dim=32),
              **OPTIONAL_FIELDS, **overrides}
    fields.update(ch_mult=tuple(int(m) for m in fields["ch_mult"]), patchify=bool(fields["patchify"]))
    return ml_collections.ConfigDict(fields)


def build(config: ml_collections.ConfigDict, params: dict | None = None, *, seed: int = 0) -> ImageTokenizer:
    """An ImageTokenizer of the model config: random init (one jitted program, RBG keys: they compile several times
    faster than threefry on CPU) or, with `params`, their values (built abstractly, no random init)."""
    if params is None:
        return nnx.jit(lambda: ImageTokenizer(config, rngs=nnx.Rngs(jax.random.key(seed, impl="rbg"))))()
    model = nnx.eval_shape(lambda: ImageTokenizer(config, rngs=nnx.Rngs(0)))
    load_param_dict(model, params)
    return model
