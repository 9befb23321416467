"""The text encoder of Infinity / VAREdit: flan-T5 (T5 v1.1) encoder, its sentencepiece tokenisation, and the
packing of its features, in Flax NNX.

Architecture (Hugging Face `T5EncoderModel`, `feed_forward_proj="gated-gelu"`):
  x = embed(ids)                                   no scaling
  per block:  x += o(attention(rmsnorm(x)))         q.k logits WITHOUT 1/sqrt(d_kv), + relative position bias
              x += wo(gelu_tanh(wi_0(h)) * wi_1(h))  h = rmsnorm(x)
  out = rmsnorm(x)                                  = last_hidden_state
  rmsnorm(x) = w * x / sqrt(mean(x^2) + eps), float32, no mean subtraction, no bias.
  The relative position bias (heads, T, T) comes from ONE table (num_buckets, heads) (HF keeps it in block 0) and is
  shared by every block; buckets are bidirectional (half per direction, exact below num_buckets / 4, log-spaced up
  to max_distance). Padding keys get a large negative logit (HF adds finfo(float32).min).
Blocks are stacked along a leading "layers" axis and run with `jax.lax.scan` (24 flan-T5-XL blocks compile once).
Compute: `config.dtype` is the dtype of the matmuls and attention (flan-T5-XL runs frozen in bfloat16 inside the
train step; float32 for parity); the residual stream, norms, logits/softmax and the output are float32.

Tokenisation (`TextTokenizer`, HF `T5Tokenizer` semantics): sentencepiece pieces (the model's own normaliser, e.g.
NFKC), `</s>` (id 1) appended, right-padded with `<pad>` (id 0) to `max_length`; truncation keeps the first
max_length - 1 pieces then `</s>`; the mask covers `</s>`. A text with no pieces (empty / whitespace-only) raises
`EmptyTextError`. Special-token strings inside a text ("</s>") are encoded as plain text.

Features: `encode` gives the padded form (B, T, C) float32 + mask (B, T) of Infinity's varlen packing (lens =
mask.sum(-1), `</s>` included); rows past lens are zero. `pack` turns it into the official `(kv_compact, lens,
cu_seqlens_k)`. T is static (config `text_max_len`, official 512) so accelerator shapes are static.

Stored text encoders (`encoder_config`): an orbax checkpoint of kind "t5" whose config holds `model`,
`text_max_len` and `spiece_proto` (the sentencepiece model, base64), so it loads with no other file
(`loading.load_text_encoder`, which also reads Hugging Face folders).
"""
import base64
import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import sentencepiece as spm
from flax import nnx

from varedit_jax import storage
from varedit_jax.params import load_param_dict, logical_init, logical_param

PAD_ID, EOS_ID = 0, 1
SPIECE_FILE = "spiece.model"
KIND = "t5"
DEFAULT_TEXT_MAX_LEN = 512
_PRECISIONS = {"highest": jax.lax.Precision.HIGHEST, "default": jax.lax.Precision.DEFAULT}
_DTYPES = ("float32", "bfloat16", "float16")


# ------------------------------------------------------------------------------------------------------- config
def default_model_config(**overrides) -> ml_collections.ConfigDict:
    """The model sub-config: flan-T5-XL unless overridden. Shape fields use the Hugging Face `T5Config` names.

    dtype: compute dtype of matmuls / attention ("float32", "bfloat16", "float16"); precision: matmul precision
    ("highest" = true float32 on accelerators, "default").
    """
    cfg = ml_collections.ConfigDict(dict(
        vocab_size=32128, d_model=2048, d_kv=64, num_heads=32, d_ff=5120, num_layers=24,
        relative_attention_num_buckets=32, relative_attention_max_distance=128, layer_norm_epsilon=1e-6,
        feed_forward_proj="gated-gelu", dtype="float32", precision="highest"))
    unknown = sorted(set(overrides) - set(cfg.keys()))
    if unknown:
        raise ValueError(f"unknown text encoder config fields {unknown}")
    cfg.update(overrides)
    return cfg


def encoder_config(model_cfg: ml_collections.ConfigDict, text_max_len: int = DEFAULT_TEXT_MAX_LEN,
                   spiece_proto: bytes | None = None) -> ml_collections.ConfigDict:
    """The stored text-encoder config: kind, model, text_max_len, spiece_proto (base64, when given)."""
    config = ml_collections.ConfigDict({"kind": KIND, "model": model_cfg.to_dict(), "text_max_len": text_max_len})
    if spiece_proto is not None:
        config.spiece_proto = base64.b64encode(spiece_proto).decode("ascii")
    return config


def spiece_proto(config: ml_collections.ConfigDict) -> bytes:
    """The serialized sentencepiece model stored in a text-encoder config."""
    if not config.get("spiece_proto"):
        raise ValueError("the text encoder config carries no sentencepiece model (spiece_proto)")
    return base64.b64decode(config.spiece_proto)


def validate_config(cfg: ml_collections.ConfigDict) -> None:
    """Raises ValueError for configs this encoder cannot run."""
    for name in ("vocab_size", "d_model", "d_kv", "num_heads", "d_ff", "num_layers",
                 "relative_attention_num_buckets", "relative_attention_max_distance"):
        if not isinstance(cfg[name], int) or cfg[name] < 1:
            raise ValueError(f"text encoder {name} must be a positive int, got {cfg[name]!r}")
    if cfg.relative_attention_num_buckets < 4 or cfg.relative_attention_num_buckets % 4:
        raise ValueError(f"relative_attention_num_buckets {cfg.relative_attention_num_buckets} must be a positive "
                         f"multiple of 4 (bidirectional buckets, half of each direction exact)")
    if cfg.feed_forward_proj != "gated-gelu":
        raise ValueError(f"feed_forward_proj {cfg.feed_forward_proj!r} is not supported; this is the T5 v1.1 / "
                         f"flan-T5 encoder ('gated-gelu')")
    if cfg.dtype not in _DTYPES:
        raise ValueError(f"text encoder dtype {cfg.dtype!r} not in {_DTYPES}")
    if cfg.precision not in _PRECISIONS:
        raise ValueError(f"text encoder precision {cfg.precision!r} not in {sorted(_PRECISIONS)}")


# ------------------------------------------------------------------------------------------ relative positions
def relative_position_buckets(length: int, num_buckets: int, max_distance: int) -> np.ndarray:
    """Bidirectional T5 buckets (length, length) int32 of relative position key - query.

    Half of the buckets per direction (key after query: upper half); within a direction distances below
    num_buckets / 4 get their own bucket, larger ones are log-spaced up to max_distance (then clamped). The log
    runs in float32 as in the PyTorch reference (bucket edges depend on its rounding).
    """
    pos = np.arange(length)
    rel = pos[None, :] - pos[:, None]
    half = num_buckets // 2
    exact = half // 2
    dist = np.abs(rel)
    ratio = np.maximum(dist, 1).astype(np.float32) / np.float32(exact)
    log_bucket = (np.log(ratio) / np.float32(math.log(max_distance / exact)) * np.float32(half - exact))
    large = np.minimum(exact + log_bucket.astype(np.int64), half - 1)
    return ((rel > 0) * half + np.where(dist < exact, dist, large)).astype(np.int32)


# ------------------------------------------------------------------------------------------------------ modules
def _dense(din: int, dout: int, names: tuple[str, str], std: float, cfg, rngs: nnx.Rngs) -> nnx.Linear:
    """Bias-free Linear, kernel (din, dout) = HF weight transposed, float32 parameters, compute in cfg.dtype."""
    return nnx.Linear(din, dout, use_bias=False, dtype=jnp.dtype(cfg.dtype), param_dtype=jnp.float32,
                      precision=_PRECISIONS[cfg.precision], rngs=rngs,
                      kernel_init=logical_init(nnx.initializers.normal(std), names))


class RMSNorm(nnx.Module):
    """T5LayerNorm: w * x / sqrt(mean(x^2) + eps) in float32 (no mean subtraction, no bias)."""

    def __init__(self, dim: int, eps: float):
        self.eps = eps
        self.weight = logical_param(jnp.ones((dim,), jnp.float32), ("norm",))

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x.astype(jnp.float32)
        return self.weight[...] * (x * jax.lax.rsqrt(jnp.mean(jnp.square(x), -1, keepdims=True) + self.eps))


class SelfAttention(nnx.Module):
    """T5 self-attention: q/k/v/o bias-free, unscaled logits + position bias, padding keys masked."""

    def __init__(self, cfg: ml_collections.ConfigDict, rngs: nnx.Rngs):
        d, inner = cfg.d_model, cfg.num_heads * cfg.d_kv
        self.num_heads, self.d_kv = cfg.num_heads, cfg.d_kv
        self.dtype, self.precision = jnp.dtype(cfg.dtype), _PRECISIONS[cfg.precision]
        self.q = _dense(d, inner, ("text_embed", "heads"), (d * cfg.d_kv) ** -0.5, cfg, rngs)
        self.k = _dense(d, inner, ("text_embed", "heads"), d ** -0.5, cfg, rngs)
        self.v = _dense(d, inner, ("text_embed", "heads"), d ** -0.5, cfg, rngs)
        self.o = _dense(inner, d, ("heads", "text_embed"), inner ** -0.5, cfg, rngs)

    def __call__(self, x: jax.Array, bias: jax.Array, key_mask: jax.Array) -> jax.Array:
        """x (B, T, C) float32, bias (N, T, T) float32, key_mask (B, T) bool -> (B, T, C) in the compute dtype."""
        b, t, _ = x.shape
        split = lambda y: y.reshape(b, t, self.num_heads, self.d_kv)  # noqa: E731
        q, k, v = split(self.q(x)), split(self.k(x)), split(self.v(x))
        logits = jnp.einsum("bqnd,bknd->bnqk", q, k, precision=self.precision, preferred_element_type=jnp.float32)
        logits = jnp.where(key_mask[:, None, None, :], logits + bias[None], jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(logits, axis=-1).astype(self.dtype)
        out = jnp.einsum("bnqk,bknd->bqnd", probs, v, precision=self.precision)
        return self.o(out.reshape(b, t, self.num_heads * self.d_kv))


class GatedFeedForward(nnx.Module):
    """T5DenseGatedActDense: wo(gelu_tanh(wi_0(h)) * wi_1(h))."""

    def __init__(self, cfg: ml_collections.ConfigDict, rngs: nnx.Rngs):
        d = cfg.d_model
        self.wi_0 = _dense(d, cfg.d_ff, ("text_embed", "mlp"), d ** -0.5, cfg, rngs)
        self.wi_1 = _dense(d, cfg.d_ff, ("text_embed", "mlp"), d ** -0.5, cfg, rngs)
        self.wo = _dense(cfg.d_ff, d, ("mlp", "text_embed"), cfg.d_ff ** -0.5, cfg, rngs)

    def __call__(self, h: jax.Array) -> jax.Array:
        return self.wo(jax.nn.gelu(self.wi_0(h), approximate=True) * self.wi_1(h))


class T5Block(nnx.Module):
    """Pre-norm residual block: attention (HF layer.0) then the gated FFN (HF layer.1)."""

    def __init__(self, cfg: ml_collections.ConfigDict, rngs: nnx.Rngs):
        self.attn_norm = RMSNorm(cfg.d_model, cfg.layer_norm_epsilon)
        self.attn = SelfAttention(cfg, rngs)
        self.ffn_norm = RMSNorm(cfg.d_model, cfg.layer_norm_epsilon)
        self.ffn = GatedFeedForward(cfg, rngs)

    def __call__(self, x: jax.Array, bias: jax.Array, key_mask: jax.Array) -> jax.Array:
        x = x + self.attn(self.attn_norm(x), bias, key_mask).astype(jnp.float32)
        return x + self.ffn(self.ffn_norm(x)).astype(jnp.float32)


class T5Encoder(nnx.Module):
    """flan-T5 (T5 v1.1) encoder. `T5Encoder(config.model, rngs=nnx.Rngs(seed))`; random init = HF's T5 init.

    Parameters: embed.embedding (vocab, C); relative_attention_bias (num_buckets, heads); blocks.* stacked
    (num_layers, ...) with kernels (in, out); final_norm.weight (C,).
    """

    def __init__(self, cfg: ml_collections.ConfigDict, *, rngs: nnx.Rngs):
        validate_config(cfg)
        self.cfg = cfg = ml_collections.FrozenConfigDict(cfg)
        self.embed = nnx.Embed(cfg.vocab_size, cfg.d_model, param_dtype=jnp.float32, rngs=rngs,
                               embedding_init=logical_init(nnx.initializers.normal(1.0),
                                                                    ("vocab", "text_embed")))
        self.relative_attention_bias = logical_param(
            nnx.initializers.normal(cfg.d_model ** -0.5)(rngs.params(), (cfg.relative_attention_num_buckets,
                                                                         cfg.num_heads), jnp.float32), ("unmodeled", "unmodeled"))
        make = nnx.split_rngs(splits=cfg.num_layers)(
            nnx.vmap(lambda r: T5Block(cfg, r), in_axes=(0,), out_axes=0,
                     transform_metadata={nnx.PARTITION_NAME: "layers"}))
        self.blocks = make(rngs)
        self.final_norm = RMSNorm(cfg.d_model, cfg.layer_norm_epsilon)

    def position_bias(self, length: int) -> jax.Array:
        """(heads, length, length) float32 bias added to every block's attention logits."""
        buckets = relative_position_buckets(length, self.cfg.relative_attention_num_buckets,
                                            self.cfg.relative_attention_max_distance)
        return jnp.transpose(self.relative_attention_bias[...][buckets], (2, 0, 1))

    def __call__(self, ids: jax.Array, mask: jax.Array) -> jax.Array:
        """ids (B, T) int, mask (B, T) (nonzero = real token) -> last_hidden_state (B, T, C) float32.

        Rows at padding positions are computed but meaningless (as in HF); `encode` zeroes them.
        """
        key_mask = mask.astype(bool)
        bias = self.position_bias(ids.shape[1])
        graphdef, state = nnx.split(self.blocks)

        def body(x, layer_state):
            return nnx.merge(graphdef, layer_state)(x, bias, key_mask), None

        x, _ = jax.lax.scan(body, self.embed(ids).astype(jnp.float32), state)
        return self.final_norm(x)


# ------------------------------------------------------------------------------------------------- features
def build(model_cfg: ml_collections.ConfigDict, params: dict) -> T5Encoder:
    """A T5Encoder of `model_cfg` holding `params` (built abstractly, no random init)."""
    model = nnx.eval_shape(lambda: T5Encoder(model_cfg, rngs=nnx.Rngs(0)))
    load_param_dict(model, params)
    return model


def encode(encoder: T5Encoder, ids: jax.Array, mask: jax.Array) -> tuple[jax.Array, jax.Array]:
    """ids (B, T) int32, mask (B, T) -> (features (B, T, C) float32 with zero rows past each length, mask bool).

    The padded form of Infinity's varlen text packing (`pack` gives the official one); call under jit. The
    encoder is frozen: no gradient flows into it.
    """
    mask = mask.astype(bool)
    features = encoder(ids, mask)
    return jax.lax.stop_gradient(jnp.where(mask[..., None], features, 0.0)), mask


class FeatureCache:
    """Host cache instruction -> frozen-encoder features (float32 (T, Ct)), each distinct instruction encoded once
    (the training option `text.cache`); cleared when it would exceed `max_items`."""

    def __init__(self, encoder: T5Encoder, max_items: int = 100_000):
        graphdef, state = nnx.split(encoder)
        self._encode = jax.jit(lambda s, ids, m: encode(nnx.merge(graphdef, s), ids, m)[0].astype(jnp.float32))
        self._state, self._store, self.max_items = state, {}, max_items

    def __call__(self, instructions, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
        """instructions (B,) with their token ids / mask (B, T) -> features (B, T, Ct) float32."""
        missing = [i for i, s in enumerate(instructions) if str(s) not in self._store]
        if missing:
            feats = np.asarray(self._encode(self._state, ids, mask))
            if len(self._store) + len(missing) > self.max_items:
                self._store.clear()
            for i in missing:
                self._store[str(instructions[i])] = feats[i]
        return np.stack([self._store[str(s)] for s in instructions])


def pack(features, mask) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Padded features (B, T, C) + right-padded mask (B, T) -> official varlen packing (numpy, host side):
    kv_compact (sum(lens), C) = concat_i features[i, :lens[i]], lens (B,) int32, cu_seqlens_k (B + 1,) int32."""
    features, mask = np.asarray(features), np.asarray(mask).astype(bool)
    if features.ndim != 3 or mask.shape != features.shape[:2]:
        raise ValueError(f"expected features (B, T, C) and mask (B, T), got {features.shape} and {mask.shape}")
    lens = mask.sum(-1).astype(np.int32)
    if not np.array_equal(mask, np.arange(mask.shape[1])[None, :] < lens[:, None]):
        raise ValueError("mask is not right-padded (each row must be ones followed by zeros)")
    cu_seqlens = np.concatenate([[0], np.cumsum(lens)]).astype(np.int32)
    kv_compact = features[mask]
    return kv_compact, lens, cu_seqlens


# --------------------------------------------------------------------------------------------- tokenisation
class EmptyTextError(ValueError):
    """Texts without a single sentencepiece piece (empty / whitespace-only); `indices` lists them."""

    def __init__(self, indices: list[int]):
        self.indices = list(indices)
        super().__init__(f"empty text (no sentencepiece pieces) at batch indices {self.indices}")

    def __reduce__(self):
        return type(self), (self.indices,)


class TextTokenizer:
    """HF `T5Tokenizer` semantics on a sentencepiece model (see the module docstring).

    `TextTokenizer(path)`: a `spiece.model` file or a folder holding one; `TextTokenizer.from_proto(bytes)` for a
    serialized model (orbax text-encoder checkpoints carry it). Picklable (grain workers).
    """

    def __init__(self, spiece_model_path):
        path = storage.path(spiece_model_path)
        if path.is_dir():
            path = path / SPIECE_FILE
        if not path.is_file():
            raise FileNotFoundError(f"no sentencepiece model at {path}")
        self._load(path.read_bytes(), str(path))

    @classmethod
    def from_proto(cls, proto: bytes, what: str = "sentencepiece proto") -> "TextTokenizer":
        tok = cls.__new__(cls)
        tok._load(proto, what)
        return tok

    def _load(self, proto: bytes, what: str) -> None:
        sp = spm.SentencePieceProcessor()
        try:
            sp.LoadFromSerializedProto(proto)
        except Exception as e:  # sentencepiece raises RuntimeError / OSError for corrupt models
            raise ValueError(f"{what}: not a sentencepiece model ({type(e).__name__}: {e})") from e
        if sp.piece_to_id("<pad>") != PAD_ID or sp.piece_to_id("</s>") != EOS_ID:
            raise ValueError(f"{what}: not a T5 sentencepiece model (<pad> must be id {PAD_ID}, </s> id {EOS_ID}; "
                             f"got {sp.piece_to_id('<pad>')}, {sp.piece_to_id('</s>')})")
        self.proto, self._sp = proto, sp

    def __getstate__(self):
        return {"proto": self.proto}

    def __setstate__(self, state):
        self._load(state["proto"], "pickled tokenizer")

    @property
    def vocab_size(self) -> int:
        """Number of sentencepiece pieces (ids 0 .. vocab_size - 1; the embedding may have more rows)."""
        return self._sp.get_piece_size()

    def __call__(self, texts, max_length: int) -> tuple[np.ndarray, np.ndarray]:
        """texts: sequence of str -> (ids int32 (B, max_length), mask bool (B, max_length)).

        Raises EmptyTextError for texts with no pieces, ValueError for max_length < 1, TypeError for non-str.
        """
        texts = list(texts)
        if not isinstance(max_length, (int, np.integer)) or max_length < 1:
            raise ValueError(f"max_length must be a positive int, got {max_length!r}")
        bad = [i for i, t in enumerate(texts) if not isinstance(t, str)]
        if bad:
            raise TypeError(f"texts must be str; got {type(texts[bad[0]]).__name__} at indices {bad[:10]}")
        pieces = self._sp.encode(texts) if texts else []
        empty = [i for i, p in enumerate(pieces) if not p]
        if empty:
            raise EmptyTextError(empty)
        ids = np.full((len(texts), max_length), PAD_ID, np.int32)
        lens = np.zeros((len(texts), 1), np.int32)
        for i, p in enumerate(pieces):
            row = p[:max_length - 1] + [EOS_ID]
            ids[i, :len(row)], lens[i] = row, len(row)
        return ids, np.arange(max_length)[None, :] < lens
