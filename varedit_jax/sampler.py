"""The editing sampler: KV-cached next-scale sampling with classifier-free guidance, parallel over every device.

Official reference: `Infinity.autoregressive_infer_cfg` (VAREdit fork) and `infer.py` (notes: infinity_official.md §6,
varedit_official.md §2-§5). One jitted program per (model, layout = resolution template, batch, text length):

  rows      the batch is run as 2B interleaved rows [cond_0, uncond_0, cond_1, uncond_1, ...] (so a batch split
            over the "data" mesh axis keeps each sample's two rows on one device). Uncond rows keep the source and
            use `cfg_uncond[:len]` of the prompt's own length, or a negative prompt's text features.
  source    `Infinity.init_decode`: the text path and the source rows through every block, once (SAR's block 0
            keeps the area-pooled source keys/values).
  scale k   `Infinity.decode_scale` -> head logits l (2B, h_k w_k, 2D); l = l * (1 / tau_k);
            l = cfg_k * l_cond + (1 - cfg_k) * l_uncond (cfg / tau per-scale lists, scalars broadcast);
            per bit the 2-way distribution (pair (2j, 2j + 1) = bit j = 0 / 1) is filtered by top-k (logits below
            the k-th largest removed, ties kept; k = min(top_k, 2), top_k <= 0 off) then top-p (ascending sort,
            classes whose cumulative softmax <= 1 - top_p removed, never the largest; top_p <= 0 off) and sampled:
            for 2 classes top_k = 1 is argmax (the fixtures), top_p = 0.97 is deterministic when the minority
            probability is <= 0.03 and a draw otherwise (the official defaults top_k 900, top_p 0.97);
            bits -> `quantizer.infer_step`: codes, summed latent, next-scale input (d56 2x2 patchify included).
  keys      sample i draws from `fold_in(key(seed), index_i)` (then `fold_in(., k)` per scale): results do not
            depend on the batch size, the batch order or the number of devices. `index` is the sample's global
            index (its row in a batch file, its position in `Editor.edit`'s list).
  forcing   `forced_bits` (B, L, D) replaces the sampled bits in the history (official gt_leak): the sampler's own
            choices and the mixed logits of every scale are returned given the forced history (parity tests).

Outputs (`SampleOutput`): bits (B, L, D) uint8, summed (B, H, W, d) float32 latent for the decoder, logits
(B, L, 2D) float32 = the CFG-mixed /tau logits the bits were drawn from (optional), finite (B,) bool (every logit
was finite; a False row is reported as an error by `Editor`).

Parallelism: a ("data", "fsdp", "tensor") mesh (`inference_mesh`); parameters are placed by their logical axis
names (`sharding.DEFAULT_RULES`: heads / mlp over "tensor" for 8B, embed over "fsdp"); batch inputs are split over
("data", "fsdp") with `jax.jit` + NamedSharding; the decode state is constrained to the same layout (KV heads over
"tensor") every scale. The batch is padded to a multiple of the data-parallel size (padded rows are dropped).
`compile_for_topology` AOT-compiles the sampler for a TPU slice on any host (`topology.make_mesh`).

Editing (`Editor`): host preprocessing (PIL) -> one jitted device step: uint8 -> [-1, 1] -> tokenizer encode (raw
features) -> `quantizer.source_tokens` -> sampler -> tokenizer decode (clamped) -> uint8 by truncation (official).
  preprocess "official" (infer.py): white pad to a square at the top-left, LANCZOS resize to the square template's
      pixel size; the output is LANCZOS-resized to the padded square and cropped back to the input size.
  preprocess "train" (the training pipeline, `data.cover_resize`): the nearest aspect template, LANCZOS
      cover-resize and centre crop to its pixel size; the output stays at that size (the crop cannot be undone).
  multi-turn: turn t edits turn t-1's uint8 output without leaving the device (same jitted step, seed + t), so it
      equals single edits chained through saved images (on the model-size canvas; official crop-back at the end).
Text: instructions are tokenized to the text max length and cut to the shortest bucket (TEXT_BUCKETS) holding the
longest one (padding keys are masked, so features are unchanged); one compile per bucket.

Compile time (CPU, 2 cores): see benchmarks/sampler.py (`compile_s` per configuration).
"""
import functools
import time
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx, struct
from jax.sharding import NamedSharding, PartitionSpec as P
from PIL import Image

from varedit_jax import conditioning, quantizer, schedules, sharding, text, topology, transformer
from varedit_jax import data as data_lib
from varedit_jax.convert import infinity as convert_infinity
from varedit_jax.convert import t5 as convert_t5
from varedit_jax.convert import vae as convert_vae

DEFAULT_CFG = 4.0    # infer.py::generate_image
DEFAULT_TAU = 0.5
DEFAULT_TOP_K = 900  # gen_one_img: min(900, 2) = 2 -> no-op for bits
DEFAULT_TOP_P = 0.97
PREPROCESS = ("official", "train")
TEXT_BUCKETS = (32, 64, 128, 256, 512)
WHITE = (255, 255, 255)


class ConfigMismatch(ValueError):
    """The transformer, tokenizer and text encoder do not fit together (bits, patchify, text width, lengths)."""


# ------------------------------------------------------------------------------------------------ sampling math
@struct.dataclass
class SamplingParams:
    """Traced per-call sampling parameters (changing them does not recompile).

    cfg, one_minus_cfg, inv_tau: (K,) float32 per scale (computed in float64 on the host and rounded once, as the
    official Python scalars); top_k: () int32 in [1, 2] (2 = off); top_p_threshold: () float32 = 1 - top_p, or -inf
    when top_p <= 0 (off).
    """
    cfg: jax.Array
    one_minus_cfg: jax.Array
    inv_tau: jax.Array
    top_k: jax.Array
    top_p_threshold: jax.Array


def per_scale(value, num_scales: int, name: str) -> np.ndarray:
    """A scalar or a per-scale sequence -> (num_scales,) float64; ValueError for a wrong length or non-finite."""
    arr = np.asarray(value, np.float64)
    if arr.ndim == 0:
        arr = np.full(num_scales, float(arr))
    if arr.shape != (num_scales,):
        raise ValueError(f"{name} must be a scalar or a list of {num_scales} values (one per scale), "
                         f"got shape {arr.shape}")
    if not np.isfinite(arr).all():
        raise ValueError(f"{name} must be finite, got {arr.tolist()}")
    return arr


def sampling_params(num_scales: int, *, cfg=DEFAULT_CFG, tau=DEFAULT_TAU, top_k: int = DEFAULT_TOP_K,
                    top_p: float = DEFAULT_TOP_P) -> SamplingParams:
    """Host-side validation and conversion of the sampling options (see `SamplingParams`)."""
    cfg_k, tau_k = per_scale(cfg, num_scales, "cfg"), per_scale(tau, num_scales, "tau")
    if (tau_k <= 0).any():
        raise ValueError(f"tau must be > 0, got {tau_k.tolist()}")
    if not 0.0 <= float(top_p) <= 1.0:
        raise ValueError(f"top_p must lie in [0, 1], got {top_p}")
    k = min(int(top_k), 2) if int(top_k) > 0 else 2
    threshold = np.float32(1.0 - float(top_p)) if float(top_p) > 0 else np.float32(-np.inf)
    return SamplingParams(cfg=jnp.asarray(cfg_k, jnp.float32), one_minus_cfg=jnp.asarray(1.0 - cfg_k, jnp.float32),
                          inv_tau=jnp.asarray(1.0 / tau_k, jnp.float32), top_k=jnp.asarray(k, jnp.int32),
                          top_p_threshold=jnp.asarray(threshold, jnp.float32))


def filter_logits(logits: jax.Array, top_k: jax.Array, top_p_threshold: jax.Array) -> jax.Array:
    """Official `sample_with_top_k_top_p_also_inplace_modifying_logits_` filtering over the last axis (V classes):
    top-k (1 <= top_k <= V; logits below the k-th largest -> -inf, ties kept), then top-p (ascending sort; classes
    whose cumulative softmax <= threshold -> -inf, never the largest)."""
    v = logits.shape[-1]
    kth = jnp.take(jnp.sort(logits, axis=-1), v - top_k, axis=-1)[..., None]
    logits = jnp.where(logits < kth, -jnp.inf, logits)
    order = jnp.argsort(logits, axis=-1)
    cumulative = jnp.cumsum(jax.nn.softmax(jnp.take_along_axis(logits, order, axis=-1), axis=-1), axis=-1)
    remove_sorted = (cumulative <= top_p_threshold) & (jnp.arange(v) < v - 1)
    remove = jnp.take_along_axis(remove_sorted, jnp.argsort(order, axis=-1), axis=-1)
    return jnp.where(remove, -jnp.inf, logits)


def sample_bits(keys: jax.Array, scale: int, logits: jax.Array, params: SamplingParams) -> jax.Array:
    """Mixed logits (B, n, 2D) -> bits (B, n, D) uint8, one key per sample (folded with the scale index)."""
    b, n, v = logits.shape
    pairs = filter_logits(logits.reshape(b, n, v // 2, 2), params.top_k, params.top_p_threshold)
    draw = jax.vmap(lambda key, l: jax.random.categorical(jax.random.fold_in(key, scale), l, axis=-1))
    return draw(keys, pairs).astype(jnp.uint8)


def seed_array(seed: int) -> jax.Array:
    """The base seed as a uint32 scalar; ValueError outside [0, 2**32)."""
    if not 0 <= int(seed) < 2 ** 32:
        raise ValueError(f"seed must lie in [0, 2**32), got {seed}")
    return jnp.uint32(int(seed))


# ------------------------------------------------------------------------------------------------ the sampler core
class SampleOutput(NamedTuple):
    """bits (B, L, D) uint8 (the sampler's choices); summed (B, H, W, d) float32 (decoder input); logits (B, L, 2D)
    float32 mixed /tau logits or None; finite (B,) bool."""
    bits: jax.Array
    summed: jax.Array
    logits: jax.Array | None
    finite: jax.Array


@struct.dataclass
class TextInputs:
    """Text conditioning of B samples. text (B, T, Ct) float32 + mask (B, T) bool of the prompts; uncond_text /
    uncond_mask of the unconditional rows (the prompt itself with uncond_drop True -> cfg_uncond[:len], or a
    negative prompt's features with uncond_drop False)."""
    text: jax.Array
    mask: jax.Array
    uncond_text: jax.Array
    uncond_mask: jax.Array
    uncond_drop: jax.Array


def text_inputs(text_feats, mask, negative: tuple | None = None, use_negative=None) -> TextInputs:
    """TextInputs from prompt features; `negative` = (features, mask) of negative prompts (same T), used on the
    rows where `use_negative` (B,) is True (default: every row)."""
    text_feats, mask = jnp.asarray(text_feats, jnp.float32), jnp.asarray(mask, bool)
    b = text_feats.shape[0]
    if negative is None:
        return TextInputs(text_feats, mask, text_feats, mask, jnp.ones((b,), bool))
    neg, neg_mask = jnp.asarray(negative[0], jnp.float32), jnp.asarray(negative[1], bool)
    if neg.shape != text_feats.shape or neg_mask.shape != mask.shape:
        raise ValueError(f"negative prompt features {neg.shape} / mask {neg_mask.shape} must match the prompts' "
                         f"{text_feats.shape} / {mask.shape}")
    use = jnp.ones((b,), bool) if use_negative is None else jnp.asarray(use_negative, bool)
    return TextInputs(text_feats, mask, jnp.where(use[:, None, None], neg, text_feats),
                      jnp.where(use[:, None], neg_mask, mask), ~use)


def _interleave(cond: jax.Array, uncond: jax.Array) -> jax.Array:
    """(B, ...) x 2 -> (2B, ...) rows [cond_0, uncond_0, cond_1, ...]."""
    return jnp.stack([cond, uncond], axis=1).reshape((-1,) + cond.shape[1:])


def sample_scales(model: transformer.Infinity, layout: conditioning.SequenceLayout, texts: TextInputs,
                  source: jax.Array | None, seed: jax.Array, index: jax.Array, params: SamplingParams, *,
                  forced_bits: jax.Array | None = None, force: jax.Array | None = None, with_logits: bool = False,
                  mesh: jax.sharding.Mesh | None = None) -> SampleOutput:
    """The traced sampler (call under jit): every scale of `layout` for B samples.

    source: (B, h_K, w_K, D) transformer-token grid (None for plain Infinity); seed () uint32; index (B,) int32
    global sample indices; forced_bits (B, L, D) or None: the history of the rows where `force` (B,) bool (default
    all) is True. `mesh` (static) constrains the decode state's layout.
    """
    b = texts.text.shape[0]
    cfg = model.cfg
    schedule = layout.schedule
    rows = dict(text=_interleave(texts.text, texts.uncond_text), mask=_interleave(texts.mask, texts.uncond_mask),
                drop=_interleave(jnp.zeros((b,), bool), texts.uncond_drop))
    source2 = None if source is None else jnp.repeat(source.astype(jnp.float32), 2, axis=0)
    state = _constrain_state(model.init_decode(rows["text"], rows["mask"], rows["drop"], source2, layout), mesh)
    keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.key(seed), i))(index)
    d = cfg.bits // 4 if cfg.patchify else cfg.bits
    summed = jnp.zeros((b,) + quantizer.vae_schedule(schedule, cfg.patchify)[-1] + (d,), jnp.float32)
    forced = None if forced_bits is None else quantizer.split_scales(forced_bits.astype(jnp.uint8), schedule)
    force = jnp.ones((b,), bool) if force is None else force
    tokens, bits, logits_out, finite = None, [], [], jnp.ones((b,), bool)
    for k in range(len(schedule)):
        logits, state = model.decode_scale(state, layout, k, tokens)
        state = _constrain_state(state, mesh)
        logits = logits.reshape((b, 2) + logits.shape[1:]) * params.inv_tau[k]
        mixed = params.cfg[k] * logits[:, 0] + params.one_minus_cfg[k] * logits[:, 1]
        finite = finite & jnp.isfinite(mixed).all(axis=(1, 2))
        chosen = sample_bits(keys, k, mixed, params)
        bits.append(chosen)
        if with_logits:
            logits_out.append(mixed)
        used = chosen if forced is None else jnp.where(force[:, None, None], forced[k], chosen)
        summed, nxt = quantizer.infer_step(summed, used, schedule, k, patchify=cfg.patchify)
        if nxt is not None:
            tokens = jnp.repeat(nxt, 2, axis=0)
    return SampleOutput(bits=jnp.concatenate(bits, 1), summed=summed,
                        logits=jnp.concatenate(logits_out, 1) if with_logits else None, finite=finite)


# ------------------------------------------------------------------------------------------------ meshes, shardings
def inference_mesh(devices: Sequence | None = None, *, tensor: int = 1, fsdp: int = 1) -> jax.sharding.Mesh:
    """A ("data", "fsdp", "tensor") mesh over `devices` (default: all), data = the rest."""
    return topology.make_mesh(tuple(devices if devices is not None else jax.devices()), data=-1, fsdp=fsdp,
                              tensor=tensor)


def shard_batch(tree, mesh: jax.sharding.Mesh):
    """Places every array of `tree` with its leading (batch) axis split over the data-parallel mesh axes."""
    return sharding.place(tree, jax.tree.map(lambda a: sharding.batch_sharding(mesh, np.ndim(a), np.shape(a)[0]), tree))


def _constrain_state(state: transformer.DecodeState, mesh: jax.sharding.Mesh | None) -> transformer.DecodeState:
    """Keeps the decode state split like the batch (rows over data/fsdp, KV heads over tensor)."""
    if mesh is None or mesh.size == 1:
        return state
    rows = state.first_k.shape[0]
    batch = sharding.batch_axes(mesh, rows)
    heads = sharding.axes_for(mesh, dict(sharding.DEFAULT_RULES)["heads"], state.first_k.shape[2],
                              set(batch or ())) or None
    u = P.UNCONSTRAINED

    def con(x, spec):
        return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))

    first, rest = P(batch, None, heads, None), P(None, batch, None, heads, None)
    return state.replace(text=jax.tree.map(lambda a: con(a, P(batch, *([u] * (a.ndim - 1)))), state.text),
                         first_k=con(state.first_k, first), first_v=con(state.first_v, first),
                         k=con(state.k, rest), v=con(state.v, rest))


def _pad_rows(tree, multiple: int):
    """Pads the leading axis of every array to a multiple of `multiple` by repeating the last row."""
    def pad(a):
        a = np.asarray(a) if not isinstance(a, jax.Array) else a
        extra = -a.shape[0] % multiple
        return a if extra == 0 else jnp.concatenate([a, jnp.repeat(a[-1:], extra, axis=0)])
    return jax.tree.map(pad, tree)


# ------------------------------------------------------------------------------------------------ jitted programs
@functools.partial(jax.jit, static_argnames=("graphdef", "layout", "with_logits", "mesh"))
def _sample_jit(graphdef, state, layout, texts, source, seed, index, params, forced_bits, force, *, with_logits,
                mesh):
    model = nnx.merge(graphdef, state)
    return sample_scales(model, layout, texts, source, seed, index, params, forced_bits=forced_bits, force=force,
                         with_logits=with_logits, mesh=mesh)


def _to_uint8(images: jax.Array) -> jax.Array:
    """[-1, 1] -> uint8 by truncation of (x + 1) / 2 * 255 (official `gen_one_img`)."""
    return jnp.clip((images + 1.0) / 2.0 * 255.0, 0.0, 255.0).astype(jnp.uint8)


def _to_unit_range(images: jax.Array) -> jax.Array:
    """uint8 -> [-1, 1] float32 as torchvision to_tensor then 2x - 1 (`data.to_unit_range`)."""
    x = images.astype(jnp.float32) / jnp.float32(255)
    return x + x - jnp.float32(1)


@functools.partial(jax.jit, static_argnames=("graphdef", "vae_graphdef", "layout", "mesh"))
def _edit_jit(graphdef, state, vae_graphdef, vae_state, layout, images, texts, seed, index, params, *, mesh):
    """uint8 images (B, H, W, 3) -> (edited uint8 images, SampleOutput without logits)."""
    model, vae = nnx.merge(graphdef, state), nnx.merge(vae_graphdef, vae_state)
    features = vae.encode(_to_unit_range(images))
    tokens = quantizer.source_tokens(features, layout.schedule, model.cfg.patchify)
    source = tokens.reshape((tokens.shape[0],) + layout.source_grid + (tokens.shape[-1],))
    out = sample_scales(model, layout, texts, source, seed, index, params, mesh=mesh)
    return _to_uint8(vae.decode(out.summed)), out


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _encode_text_jit(graphdef, state, ids, mask):
    return text.encode(nnx.merge(graphdef, state), ids, mask)


# ------------------------------------------------------------------------------------------------ the Sampler
class Sampler:
    """A transformer placed on a mesh, sampling batches (`sample`) and lowering for AOT compiles (`lower`).

    model: an `Infinity` (its parameters are copied onto the mesh); mesh: default `inference_mesh()` over every
    device (tensor=1).
    """

    def __init__(self, model: transformer.Infinity, mesh: jax.sharding.Mesh | None = None):
        self.mesh = mesh if mesh is not None else inference_mesh()
        self.cfg = model.cfg
        self.graphdef, state = nnx.split(model)
        self.state = sharding.place(state, sharding.param_shardings(state, self.mesh))

    @property
    def data_size(self) -> int:
        return sharding.data_parallel_size(self.mesh)

    def sample(self, layout: conditioning.SequenceLayout, text_feats, text_mask, source=None, *, seed: int = 0,
               index=None, cfg=DEFAULT_CFG, tau=DEFAULT_TAU, top_k: int = DEFAULT_TOP_K, top_p: float = DEFAULT_TOP_P,
               negative: tuple | None = None, forced_bits=None, with_logits: bool = True) -> SampleOutput:
        """Samples B edits (host entry; pads the batch to the data-parallel size and drops the padding).

        text_feats (B, T, Ct), text_mask (B, T); source (B, h_K, w_K, D) or None; index (B,) global indices
        (default arange(B)); negative (features, mask) of negative prompts; forced_bits (B, L, D) teacher forcing.
        Free and forced runs share one compiled program (forcing is a per-row flag).
        """
        b = int(np.shape(text_feats)[0])
        index = np.arange(b, dtype=np.int32) if index is None else np.asarray(index, np.int32)
        if index.shape != (b,):
            raise ValueError(f"index must have shape ({b},), got {index.shape}")
        params = sampling_params(len(layout.schedule), cfg=cfg, tau=tau, top_k=top_k, top_p=top_p)
        texts = text_inputs(text_feats, text_mask, negative)
        shape = (b, layout.n_target, self.cfg.bits)
        force = np.full((b,), forced_bits is not None)
        forced_bits = np.zeros(shape, np.uint8) if forced_bits is None else np.asarray(forced_bits, np.uint8)
        if forced_bits.shape != shape:
            raise ValueError(f"forced_bits must have shape {shape}, got {forced_bits.shape}")
        batch = _pad_rows((texts, source, index, forced_bits, force), self.data_size)
        texts_p, source_p, index_p, forced_p, force_p = shard_batch(batch, self.mesh)
        with jax.set_mesh(self.mesh):
            out = _sample_jit(self.graphdef, self.state, layout, texts_p, source_p, seed_array(seed), index_p,
                              params, forced_p, force_p, with_logits=with_logits, mesh=self.mesh)
        if jax.process_count() > 1:  # global arrays are not sliceable by one process
            out = sharding.fetch(out)
        return SampleOutput(*(None if x is None else x[:b] for x in out))

    def lower(self, layout: conditioning.SequenceLayout, batch: int, text_len: int, *,
              with_logits: bool = False) -> jax.stages.Lowered:
        """Lowers the sampler for abstract inputs (B = batch padded to the data size, T = text_len)."""
        b = -(-batch // self.data_size) * self.data_size
        cfg = self.cfg
        f32 = jnp.float32

        def spec(shape, dtype):
            return jax.ShapeDtypeStruct(shape, dtype, sharding=sharding.batch_sharding(self.mesh, len(shape), shape[0]))

        texts = TextInputs(spec((b, text_len, cfg.text_dim), f32), spec((b, text_len), bool),
                           spec((b, text_len, cfg.text_dim), f32), spec((b, text_len), bool), spec((b,), bool))
        source = None if layout.source_grid is None else spec((b,) + layout.source_grid + (cfg.bits,), f32)
        k = len(layout.schedule)
        rep = NamedSharding(self.mesh, P())
        params = SamplingParams(*(jax.ShapeDtypeStruct(s, d, sharding=rep) for s, d in
                                  (((k,), f32), ((k,), f32), ((k,), f32), ((), jnp.int32), ((), f32))))
        with jax.set_mesh(self.mesh):
            return _sample_jit.lower(self.graphdef, self.state, layout, texts, source,
                                     jax.ShapeDtypeStruct((), jnp.uint32, sharding=rep), spec((b,), jnp.int32),
                                     params, spec((b, layout.n_target, cfg.bits), jnp.uint8), spec((b,), bool),
                                     with_logits=with_logits, mesh=self.mesh)


def sample(model: transformer.Infinity, layout: conditioning.SequenceLayout, text_feats, text_mask, source=None, *,
           mesh: jax.sharding.Mesh | None = None, **options) -> SampleOutput:
    """One-off `Sampler(model, mesh).sample(layout, ...)` (options as `Sampler.sample`); keep a Sampler to reuse
    the placed parameters."""
    return Sampler(model, mesh).sample(layout, text_feats, text_mask, source, **options)


def compile_for_topology(config: ml_collections.ConfigDict, slice_name: str, *, batch: int,
                         resolution: int | None = None, template: str = "1.0", text_len: int | None = None, data: int = -1,
                         tensor: int = 1, attention_impl: str | None = None) -> tuple[jax.stages.Compiled, float]:
    """AOT-compiles the sampler of a transformer config for a TPU slice (e.g. "v5p-8") on any host (libtpu, no
    TPU): abstract parameters placed by their logical names on a ("data", "fsdp", "tensor") mesh of the slice.
    `text_len` defaults to the model's `text_max_len`. Returns (compiled, seconds); `compiled.memory_analysis()`
    gives per-device memory."""
    model_cfg = transformer.default_model_config(**dict(config.model.items()))
    if attention_impl is not None:
        model_cfg.attention_impl = attention_impl
    mesh = topology.make_mesh(slice_name, data=data, fsdp=1, tensor=tensor)
    abstract = nnx.eval_shape(lambda: transformer.Infinity(model_cfg, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    shardings = sharding.param_shardings(state, mesh)
    sampler = Sampler.__new__(Sampler)
    sampler.mesh, sampler.cfg, sampler.graphdef = mesh, abstract.cfg, graphdef
    sampler.state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), state, shardings)
    layout = conditioning.sequence_layout(config.get("conditioning", "sar"),
                                          schedules.scale_schedule(template, _pn(config, resolution)), template)
    t0 = time.perf_counter()
    compiled = sampler.lower(layout, batch, text_len or model_cfg.text_max_len).compile()
    return compiled, time.perf_counter() - t0


def _pn(config: ml_collections.ConfigDict, resolution: int | None) -> str:
    """The size class: `resolution` (256/512/1024) if given, else the config's pn."""
    if resolution is not None:
        return schedules.pn_for_resolution(int(resolution))
    if config.get("pn"):
        return config.pn
    raise ValueError("the checkpoint config has no pn (an imported official checkpoint?): pass a resolution "
                     f"({', '.join(map(str, schedules.RESOLUTION_TO_PN))})")


# ------------------------------------------------------------------------------------------------ pre/post-processing
def as_uint8_image(image) -> np.ndarray:
    """A PIL image or an (H, W, 3) uint8 array -> uint8 (H, W, 3) RGB."""
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"))
    arr = np.asarray(image)
    if arr.dtype != np.uint8 or arr.ndim != 3 or arr.shape[-1] != 3:
        raise ValueError(f"images must be PIL images or uint8 (H, W, 3) arrays, got {arr.dtype} {arr.shape}")
    return arr


def choose_template(shape: tuple[int, int], preprocess: str) -> str:
    """The aspect template of an (H, W) image: square for the official padding, else the nearest one."""
    if preprocess not in PREPROCESS:
        raise ValueError(f"preprocess must be one of {PREPROCESS}, got {preprocess!r}")
    return "1.0" if preprocess == "official" else schedules.nearest_template(shape[0] / shape[1])


def preprocess_image(image: np.ndarray, size: tuple[int, int], preprocess: str) -> np.ndarray:
    """uint8 (h, w, 3) -> uint8 (H, W, 3) model input (see the module docstring)."""
    img = Image.fromarray(image)
    if preprocess == "official":
        side = max(img.size)
        canvas = Image.new("RGB", (side, side), WHITE)
        canvas.paste(img, (0, 0))
        return np.asarray(canvas.resize((size[1], size[0]), Image.Resampling.LANCZOS))
    if preprocess == "train":
        return data_lib.cover_resize(img, size, Image.Resampling.LANCZOS)
    raise ValueError(f"preprocess must be one of {PREPROCESS}, got {preprocess!r}")


def postprocess_image(output: np.ndarray, original: tuple[int, int], preprocess: str) -> np.ndarray:
    """Model output uint8 (H, W, 3) -> the returned image: official: LANCZOS to the padded square of the input,
    crop (0, 0, w, h); train: unchanged."""
    if preprocess != "official":
        return output
    h, w = original
    side = max(h, w)
    return np.asarray(Image.fromarray(output).resize((side, side), Image.Resampling.LANCZOS))[:h, :w]


# ------------------------------------------------------------------------------------------------ the Editor
def _text_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    return config.get("text") or ml_collections.ConfigDict()


class Editor:
    """Instruction-guided editing with a VAREdit transformer, its tokenizer and text encoder.

    config: the transformer checkpoint config (kind "varedit", conditioning, pn, model, optional text.max_len);
    params: the transformer's parameter tree; tokenizer: `tokenizer.AutoEncoder`; text_encoder: `text.T5Encoder`;
    text_tokenizer: `text.TextTokenizer`. mesh: default `inference_mesh(tensor=tensor)` over every device;
    batch_size: samples per device step (default: the data-parallel size), padded to a multiple of it.
    """

    def __init__(self, config: ml_collections.ConfigDict, params, tokenizer, text_encoder, text_tokenizer, *,
                 mesh: jax.sharding.Mesh | None = None, tensor: int = 1, batch_size: int | None = None):
        if config.get("kind") not in ("varedit", None):
            raise ConfigMismatch(f"the checkpoint is a {config.get('kind')!r} model, not an editing model ('varedit')")
        self.config = config
        self.conditioning = conditioning.source_mode(config.get("conditioning"))
        model_cfg = transformer.default_model_config(**dict(config.model.items()))
        check_components(model_cfg, tokenizer, text_encoder)
        self.text_len = text_max_len(config, model_cfg, text_encoder)
        mesh = mesh if mesh is not None else inference_mesh(tensor=tensor)
        self.sampler = Sampler(transformer.build(model_cfg, params), mesh)
        self.mesh = mesh
        self.vae_graphdef, vae_state = nnx.split(tokenizer)
        self.vae_state = sharding.place(vae_state, sharding.param_shardings(vae_state, mesh))
        self.stride = tokenizer.stride
        self.text_graphdef, text_state = nnx.split(text_encoder)
        self.text_state = sharding.place(text_state, sharding.param_shardings(text_state, mesh))
        self.text_tokenizer = text_tokenizer
        dp = self.sampler.data_size
        self.batch_size = -(-(batch_size or dp) // dp) * dp

    @classmethod
    def from_checkpoint(cls, path, vae=None, text_encoder=None, **kwargs) -> "Editor":
        """An Editor from a transformer checkpoint (trained / imported orbax checkpoint, or official weights) with
        the tokenizer and text encoder named by `vae` / `text_encoder` (override the config's `vae.path` /
        `text.path`). Raises FileNotFoundError / ConfigMismatch / ValueError with the reason."""
        config, model = convert_infinity.load_transformer(path)
        vae_path = vae or (config.get("vae") or {}).get("path")
        text_path = text_encoder or _text_config(config).get("path")
        if not vae_path:
            raise ConfigMismatch(f"{path}: the config names no tokenizer (vae.path): pass --vae")
        if not text_path:
            raise ConfigMismatch(f"{path}: the config names no text encoder (text.path): pass --text-encoder")
        tok = convert_vae.load_tokenizer(vae_path)
        _, encoder, text_tok = convert_t5.load_text_encoder(text_path)
        return cls(config, transformer.param_dict(model), tok, encoder, text_tok, **kwargs)

    # -------------------------------------------------------------------------------------------- text
    def encode_text(self, prompts: Sequence[str], length: int | None = None) -> tuple[jax.Array, jax.Array]:
        """Prompts -> (features (B, T, Ct), mask (B, T)) on the mesh; T = `length` or the bucket of the longest."""
        ids, mask = self.text_tokenizer(list(prompts), self.text_len)
        t = length or text_bucket(int(mask.sum(1).max()), self.text_len)
        ids, mask = _pad_rows((ids[:, :t], mask[:, :t]), self.sampler.data_size)
        ids, mask = shard_batch((ids, mask), self.mesh)
        with jax.set_mesh(self.mesh):
            feats, mask = _encode_text_jit(self.text_graphdef, self.text_state, ids, mask)
        return feats[:len(prompts)], mask[:len(prompts)]

    def _texts(self, prompts: Sequence[str], negative: Sequence[str | None] | None) -> TextInputs:
        prompts = list(prompts)
        empty = [i for i, p in enumerate(prompts) if not isinstance(p, str) or not p.strip()]
        if empty:
            raise ValueError(f"empty instruction at indices {empty}")
        negs = [None] * len(prompts) if negative is None else list(negative)
        use = np.array([n is not None for n in negs])
        lengths = self.text_tokenizer(prompts + [n for n in negs if n is not None], self.text_len)[1].sum(1)
        t = text_bucket(int(lengths.max()), self.text_len)
        feats, mask = self.encode_text(prompts, t)
        if not use.any():
            return text_inputs(feats, mask)
        neg_feats, neg_mask = self.encode_text([n if n is not None else p for n, p in zip(negs, prompts)], t)
        return text_inputs(feats, mask, (neg_feats, neg_mask), use)

    # -------------------------------------------------------------------------------------------- editing
    def schedule(self, template: str, resolution: int | None) -> schedules.Schedule:
        return schedules.scale_schedule(template, _pn(self.config, resolution))

    def edit(self, images, instructions: Sequence[str], *, cfg=DEFAULT_CFG, tau=DEFAULT_TAU, seed: int = 0,
             resolution: int | None = None, preprocess: str = "official", top_k: int = DEFAULT_TOP_K,
             top_p: float = DEFAULT_TOP_P, negative=None, indices=None) -> list[np.ndarray]:
        """Edits images (uint8 (B, H, W, 3), or a list of PIL images / uint8 arrays) by one instruction each ->
        list of uint8 (H, W, 3) images (see the module docstring for sizes). negative: None, one string for all, or
        a list (None entries: cfg_uncond). indices: global sample indices for the keys (default 0..B-1)."""
        return self.edit_turns(images, [instructions], cfg=cfg, tau=tau, seed=seed, resolution=resolution,
                               preprocess=preprocess, top_k=top_k, top_p=top_p, negative=negative,
                               indices=indices)[-1]

    def edit_turns(self, images, turns: Sequence[Sequence[str]], *, cfg=DEFAULT_CFG, tau=DEFAULT_TAU, seed: int = 0,
                   resolution: int | None = None, preprocess: str = "official", top_k: int = DEFAULT_TOP_K,
                   top_p: float = DEFAULT_TOP_P, negative=None, indices=None) -> list[list[np.ndarray]]:
        """Multi-turn editing: turns[t][i] is image i's instruction at turn t; turn t edits turn t-1's output on the
        device with seed + t. Returns the images of every turn, [turn][image]."""
        seed_array(seed + max(len(turns) - 1, 0))
        arrays = [as_uint8_image(im) for im in (list(images) if not isinstance(images, np.ndarray) else images)]
        n = len(arrays)
        turns = [list(t) for t in turns]
        if not turns or any(len(t) != n for t in turns):
            raise ValueError(f"every turn needs one instruction per image ({n}), got {[len(t) for t in turns]}")
        negs = [negative] * n if negative is None or isinstance(negative, str) else list(negative)
        if len(negs) != n:
            raise ValueError(f"negative: expected {n} prompts, got {len(negs)}")
        indices = np.arange(n) if indices is None else np.asarray(indices)
        if indices.shape != (n,):
            raise ValueError(f"indices must have shape ({n},), got {indices.shape}")
        results = [[None] * n for _ in turns]
        groups: dict[str, list[int]] = {}
        for i, arr in enumerate(arrays):
            groups.setdefault(choose_template(arr.shape[:2], preprocess), []).append(i)
        for template, members in groups.items():
            layout = conditioning.sequence_layout(self.conditioning, self.schedule(template, resolution), template)
            size = schedules.pixel_size(layout.schedule, self.stride)
            params = sampling_params(len(layout.schedule), cfg=cfg, tau=tau, top_k=top_k, top_p=top_p)
            for start in range(0, len(members), self.batch_size):
                chunk = members[start:start + self.batch_size]
                inputs = np.stack([preprocess_image(arrays[i], size, preprocess) for i in chunk])
                outs = self._run_turns(layout, inputs, [[t[i] for i in chunk] for t in turns],
                                       [negs[i] for i in chunk], indices[chunk], seed, params)
                for t, out in enumerate(outs):
                    for j, i in enumerate(chunk):
                        results[t][i] = postprocess_image(out[j], arrays[i].shape[:2], preprocess)
        return results

    def _run_turns(self, layout, images: np.ndarray, turns, negs, indices, seed: int, params) -> list[np.ndarray]:
        """One chunk through every turn on the device; returns uint8 (b, H, W, 3) per turn."""
        b = len(images)
        current = shard_batch(_pad_rows(images, self.sampler.data_size), self.mesh)
        index = shard_batch(_pad_rows(np.asarray(indices, np.int32), self.sampler.data_size), self.mesh)
        outs = []
        for t, prompts in enumerate(turns):
            texts = self._texts(prompts, negs if any(n is not None for n in negs) else None)
            texts = shard_batch(_pad_rows(texts, self.sampler.data_size), self.mesh)
            with jax.set_mesh(self.mesh):
                current, out = _edit_jit(self.sampler.graphdef, self.sampler.state, self.vae_graphdef,
                                         self.vae_state, layout, current, texts, seed_array(seed + t), index, params,
                                         mesh=self.mesh)
            outs.append((current, out.finite))
        fetched = []
        for t, (images_t, finite) in enumerate(sharding.fetch(outs)):
            bad = [int(indices[j]) for j in np.flatnonzero(~np.asarray(finite)[:b])]
            if bad:
                raise FloatingPointError(f"non-finite logits at turn {t} for samples {bad} (corrupt weights or "
                                         "inputs?)")
            fetched.append(np.asarray(images_t)[:b])
        return fetched


def text_bucket(length: int, max_len: int) -> int:
    """The shortest TEXT_BUCKETS entry >= length, capped at max_len."""
    return min(next((b for b in TEXT_BUCKETS if b >= length), max_len), max_len)


def text_max_len(config: ml_collections.ConfigDict, model_cfg: ml_collections.ConfigDict, text_encoder) -> int:
    """Tokenizer length: the config's text.max_len (must fit the model's cfg_uncond rows), else the model's
    text_max_len."""
    wanted = _text_config(config).get("max_len")
    if wanted is None:
        return int(model_cfg.text_max_len)
    if int(wanted) > model_cfg.text_max_len:
        raise ConfigMismatch(f"text.max_len {wanted} exceeds the transformer's text_max_len "
                             f"{model_cfg.text_max_len} (rows of cfg_uncond)")
    return int(wanted)


def check_components(model_cfg: ml_collections.ConfigDict, tokenizer, text_encoder) -> None:
    """Raises ConfigMismatch when the tokenizer's bits / patchify or the text encoder's width do not fit the
    transformer."""
    bits = quantizer.token_dim(tokenizer.codebook_dim, tokenizer.patchify)
    if bits != model_cfg.bits or bool(tokenizer.patchify) != bool(model_cfg.patchify):
        raise ConfigMismatch(f"tokenizer gives {bits}-bit tokens (d={tokenizer.codebook_dim}, patchify="
                             f"{tokenizer.patchify}) but the transformer expects {model_cfg.bits} bits "
                             f"(patchify={model_cfg.patchify})")
    width = text_encoder.cfg.d_model
    if width != model_cfg.text_dim:
        raise ConfigMismatch(f"text encoder width {width} != the transformer's text_dim {model_cfg.text_dim}")
