"""The editing sampler: KV-cached next-scale sampling with classifier-free guidance, parallel over every device.

Official reference: `Infinity.autoregressive_infer_cfg` (VAREdit fork) and `infer.py` (notes: infinity_official.md §6,
varedit_official.md §2-§5). One jitted program per (model, layout = resolution template, batch, text length):

  rows      the batch is run as 2B interleaved rows [cond_0, uncond_0, cond_1, uncond_1, ...] (so a batch split
            over the "data" mesh axis keeps each sample's two rows on one device). Uncond rows keep the source and
            use `cfg_uncond[:len]` of the prompt's own length, or a negative prompt's text features.
  source    `Infinity.init_decode`: the text path and the source rows through every block, once (SAR's block 0
            keeps the area-pooled source keys/values).
  scale k   `Infinity.decode_scale` -> head logits l (2B, h_k w_k, 2D); l = l * (1 / tau_k);
            l = g_k * l_cond + (1 - g_k) * l_uncond (guidance g / tau per-scale lists, scalars broadcast);
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

Parallelism: a ("dcn", "data", "fsdp", "tensor") mesh of one slice (`inference_mesh`, dcn 1); parameters are placed by their logical axis
names (`sharding.DEFAULT_RULES`: heads / mlp over "tensor" for 8B, embed over "fsdp"); batch inputs are split over
("data", "fsdp") with `jax.jit` + NamedSharding; the decode state is constrained to the same layout (KV heads over
"tensor") every scale. The batch is padded to a multiple of the data-parallel size (padded rows are dropped).
`compile_for_topology` AOT-compiles the sampler for a TPU slice on any host (`topology.make_mesh`).

Editing images with it (pre/post-processing, the image tokenizer, text encoding): `varedit_jax.editor`.

Compile time (CPU, 2 cores): see benchmarks/sampler.py (`compile_s` per configuration).
"""
import dataclasses
import functools
import time
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx, struct
from jax.sharding import NamedSharding, PartitionSpec as P

from varedit_jax import conditioning, quantizer, schedules, sharding, topology, transformer

DEFAULT_GUIDANCE = 4.0  # infer.py::generate_image
DEFAULT_TAU = 0.5
DEFAULT_TOP_K = 900     # gen_one_img: min(900, 2) = 2 -> no-op for bits
DEFAULT_TOP_P = 0.97


# ------------------------------------------------------------------------------------------------ sampling math
@dataclasses.dataclass(frozen=True)
class SamplingOptions:
    """How to sample: guidance (the classifier-free guidance scale) and tau (temperature), each a scalar or one value
    per scale; top_k / top_p per bit (top_k <= 0 or >= 2, top_p <= 0: off; top_k 1 = argmax); seed (base key)."""
    guidance: float | Sequence[float] = DEFAULT_GUIDANCE
    tau: float | Sequence[float] = DEFAULT_TAU
    top_k: int = DEFAULT_TOP_K
    top_p: float = DEFAULT_TOP_P
    seed: int = 0

    def per_scale(self, num_scales: int) -> "ScaleSampling":
        """Host-side validation and conversion to the traced arrays (see `ScaleSampling`); ValueError for bad
        values."""
        guidance, tau = per_scale(self.guidance, num_scales, "guidance"), per_scale(self.tau, num_scales, "tau")
        if (tau <= 0).any():
            raise ValueError(f"tau must be > 0, got {tau.tolist()}")
        if not 0.0 <= float(self.top_p) <= 1.0:
            raise ValueError(f"top_p must lie in [0, 1], got {self.top_p}")
        k = min(int(self.top_k), 2) if int(self.top_k) > 0 else 2
        threshold = np.float32(1.0 - float(self.top_p)) if float(self.top_p) > 0 else np.float32(-np.inf)
        return ScaleSampling(guidance=jnp.asarray(guidance, jnp.float32),
                             one_minus_guidance=jnp.asarray(1.0 - guidance, jnp.float32),
                             inv_tau=jnp.asarray(1.0 / tau, jnp.float32), top_k=jnp.asarray(k, jnp.int32),
                             top_p_threshold=jnp.asarray(threshold, jnp.float32))


@struct.dataclass
class ScaleSampling:
    """The traced form of `SamplingOptions` (changing them does not recompile).

    guidance, one_minus_guidance, inv_tau: (K,) float32 per scale (computed in float64 on the host and rounded once,
    as the official Python scalars); top_k: () int32 in [1, 2] (2 = off); top_p_threshold: () float32 = 1 - top_p,
    or -inf when top_p <= 0 (off).
    """
    guidance: jax.Array
    one_minus_guidance: jax.Array
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


def filter_logits(logits: jax.Array, top_k: jax.Array, top_p_threshold: jax.Array) -> jax.Array:
    """Official `sample_with_top_k_top_p_also_inplace_modifying_logits_` filtering over the last axis (V classes):
    top-k (1 <= top_k <= V; logits below the k-th largest -> -inf, ties kept), then top-p (ascending sort; classes
    whose cumulative softmax <= threshold -> -inf, never the largest)."""
    v = logits.shape[-1]
    if v == 2:
        return _filter_pairs(logits, top_k, top_p_threshold)
    kth = jnp.take(jnp.sort(logits, axis=-1), v - top_k, axis=-1)[..., None]
    logits = jnp.where(logits < kth, -jnp.inf, logits)
    order = jnp.argsort(logits, axis=-1)
    cumulative = jnp.cumsum(jax.nn.softmax(jnp.take_along_axis(logits, order, axis=-1), axis=-1), axis=-1)
    remove_sorted = (cumulative <= top_p_threshold) & (jnp.arange(v) < v - 1)
    remove = jnp.take_along_axis(remove_sorted, jnp.argsort(order, axis=-1), axis=-1)
    return jnp.where(remove, -jnp.inf, logits)


def _filter_pairs(logits: jax.Array, top_k: jax.Array, top_p_threshold: jax.Array) -> jax.Array:
    """`filter_logits` for 2 classes without sorting (the same values: the smaller logit, the first on ties as in
    a stable ascending sort, is the only one either filter can remove; its probability is computed exactly as the
    softmax of the sorted pair)."""
    a, c = logits[..., 0], logits[..., 1]
    first_larger = c < a
    small, large = jnp.where(first_larger, c, a), jnp.where(first_larger, a, c)
    small = jnp.where((top_k < 2) & (small < large), -jnp.inf, small)
    e = jnp.exp(small - large)
    small = jnp.where(e / (e + 1.0) <= top_p_threshold, -jnp.inf, small)
    return jnp.stack([jnp.where(first_larger, large, small), jnp.where(first_larger, small, large)], axis=-1)


def sample_bits(keys: jax.Array, scale: int, logits: jax.Array, sampling: ScaleSampling) -> jax.Array:
    """Mixed logits (B, n, 2D) -> bits (B, n, D) uint8, one key per sample (folded with the scale index)."""
    b, n, v = logits.shape
    pairs = filter_logits(logits.reshape(b, n, v // 2, 2), sampling.top_k, sampling.top_p_threshold)
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
                  source: jax.Array | None, seed: jax.Array, index: jax.Array, sampling: ScaleSampling, *,
                  forced_bits: jax.Array | None = None, force: jax.Array | None = None, with_logits: bool = False,
                  mesh: jax.sharding.Mesh | None = None) -> SampleOutput:
    """The traced sampler (call under jit): every scale of `layout` for B samples.

    source: (B, h_K, w_K, D) transformer-token grid (None for plain Infinity); seed () uint32; index (B,) int32
    global sample indices; forced_bits (B, L, D) or None: the history of the rows where `force` (B,) bool (default
    all) is True. `mesh` (static) constrains the decode state's layout.
    """
    b = texts.text.shape[0]
    model_cfg = model.cfg
    schedule = layout.schedule
    rows = dict(text=_interleave(texts.text, texts.uncond_text), mask=_interleave(texts.mask, texts.uncond_mask),
                drop=_interleave(jnp.zeros((b,), bool), texts.uncond_drop))
    source2 = None if source is None else jnp.repeat(source.astype(jnp.float32), 2, axis=0)
    state = _constrain_state(model.init_decode(rows["text"], rows["mask"], rows["drop"], source2, layout), mesh)
    keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.key(seed), i))(index)
    d = model_cfg.bits // 4 if model_cfg.patchify else model_cfg.bits
    summed = jnp.zeros((b,) + quantizer.vae_schedule(schedule, model_cfg.patchify)[-1] + (d,), jnp.float32)
    forced = None if forced_bits is None else quantizer.split_scales(forced_bits.astype(jnp.uint8), schedule)
    force = jnp.ones((b,), bool) if force is None else force
    tokens, bits, logits_out, finite = None, [], [], jnp.ones((b,), bool)
    for k in range(len(schedule)):
        logits, state = model.decode_scale(state, layout, k, tokens)
        state = _constrain_state(state, mesh)
        logits = logits.reshape((b, 2) + logits.shape[1:]) * sampling.inv_tau[k]
        mixed = sampling.guidance[k] * logits[:, 0] + sampling.one_minus_guidance[k] * logits[:, 1]
        finite = finite & jnp.isfinite(mixed).all(axis=(1, 2))
        chosen = sample_bits(keys, k, mixed, sampling)
        bits.append(chosen)
        if with_logits:
            logits_out.append(mixed)
        used = chosen if forced is None else jnp.where(force[:, None, None], forced[k], chosen)
        summed, nxt = quantizer.infer_step(summed, used, schedule, k, patchify=model_cfg.patchify)
        if nxt is not None:
            tokens = jnp.repeat(nxt, 2, axis=0)
    return SampleOutput(bits=jnp.concatenate(bits, 1), summed=summed,
                        logits=jnp.concatenate(logits_out, 1) if with_logits else None, finite=finite)


# ------------------------------------------------------------------------------------------------ meshes, shardings
def inference_mesh(devices: Sequence | None = None, *, tensor: int = 1, fsdp: int = 1) -> jax.sharding.Mesh:
    """A one-slice ("dcn", "data", "fsdp", "tensor") mesh over `devices` (default: all), data = the rest."""
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


def pad_rows(tree, multiple: int):
    """Pads the leading axis of every array to a multiple of `multiple` by repeating the last row."""
    def pad(a):
        a = np.asarray(a) if not isinstance(a, jax.Array) else a
        extra = -a.shape[0] % multiple
        return a if extra == 0 else jnp.concatenate([a, jnp.repeat(a[-1:], extra, axis=0)])
    return jax.tree.map(pad, tree)


# ------------------------------------------------------------------------------------------------ jitted programs
@functools.partial(jax.jit, static_argnames=("graphdef", "layout", "with_logits", "mesh"))
def _sample_jit(graphdef, state, layout, texts, source, seed, index, sampling, forced_bits, force, *, with_logits,
                mesh):
    model = nnx.merge(graphdef, state)
    return sample_scales(model, layout, texts, source, seed, index, sampling, forced_bits=forced_bits, force=force,
                         with_logits=with_logits, mesh=mesh)


# ------------------------------------------------------------------------------------------------ the Sampler
class Sampler:
    """A transformer's graphdef and state placed on a mesh, sampling batches (`sample`) and lowering for AOT compiles
    (`lower`). Build with `Sampler.from_model(model, mesh)`; for `lower` alone `state` may be abstract
    (ShapeDtypeStructs with shardings). model_cfg: the transformer's model config.
    """

    def __init__(self, graphdef, state, mesh: jax.sharding.Mesh, model_cfg: ml_collections.ConfigDict):
        self.graphdef, self.state, self.mesh, self.model_cfg = graphdef, state, mesh, model_cfg

    @classmethod
    def from_model(cls, model: transformer.Infinity, mesh: jax.sharding.Mesh | None = None,
                   rules=None) -> "Sampler":
        """A Sampler holding `model`'s parameters placed on `mesh` (default `inference_mesh()` over every device) by
        their logical axis names (`rules`: default `sharding.DEFAULT_RULES`); parameters already placed so (e.g. a
        training state's, on the training mesh with its rules) are used as they are, not copied."""
        mesh = mesh if mesh is not None else inference_mesh()
        graphdef, state = nnx.split(model)
        return cls(graphdef, sharding.place(state, sharding.param_shardings(state, mesh, rules)), mesh, model.cfg)

    @property
    def data_size(self) -> int:
        return sharding.data_parallel_size(self.mesh)

    def sample(self, layout: conditioning.SequenceLayout, text_feats, text_mask, source=None, *,
               options: SamplingOptions = SamplingOptions(), index=None, negative: tuple | None = None,
               forced_bits=None, with_logits: bool = True) -> SampleOutput:
        """Samples B edits (host entry; pads the batch to the data-parallel size and drops the padding).

        text_feats (B, T, Ct), text_mask (B, T); source (B, h_K, w_K, D) or None; index (B,) global indices
        (default arange(B)); negative (features, mask) of negative prompts; forced_bits (B, L, D) teacher forcing.
        Free and forced runs share one compiled program (forcing is a per-row flag).
        """
        b = int(np.shape(text_feats)[0])
        index = np.arange(b, dtype=np.int32) if index is None else np.asarray(index, np.int32)
        if index.shape != (b,):
            raise ValueError(f"index must have shape ({b},), got {index.shape}")
        sampling = options.per_scale(len(layout.schedule))
        texts = text_inputs(text_feats, text_mask, negative)
        shape = (b, layout.n_target, self.model_cfg.bits)
        force = np.full((b,), forced_bits is not None)
        forced_bits = np.zeros(shape, np.uint8) if forced_bits is None else np.asarray(forced_bits, np.uint8)
        if forced_bits.shape != shape:
            raise ValueError(f"forced_bits must have shape {shape}, got {forced_bits.shape}")
        batch = pad_rows((texts, source, index, forced_bits, force), self.data_size)
        texts_p, source_p, index_p, forced_p, force_p = shard_batch(batch, self.mesh)
        with jax.set_mesh(self.mesh):
            out = _sample_jit(self.graphdef, self.state, layout, texts_p, source_p, seed_array(options.seed),
                              index_p, sampling, forced_p, force_p, with_logits=with_logits, mesh=self.mesh)
        if jax.process_count() > 1:  # global arrays are not sliceable by one process
            out = sharding.fetch(out)
        return SampleOutput(*(None if x is None else x[:b] for x in out))

    def lower(self, layout: conditioning.SequenceLayout, batch: int, text_len: int, *,
              with_logits: bool = False) -> jax.stages.Lowered:
        """Lowers the sampler for abstract inputs (B = batch padded to the data size, T = text_len)."""
        b = -(-batch // self.data_size) * self.data_size
        model_cfg = self.model_cfg
        f32 = jnp.float32

        def spec(shape, dtype):
            return jax.ShapeDtypeStruct(shape, dtype, sharding=sharding.batch_sharding(self.mesh, len(shape), shape[0]))

        texts = TextInputs(spec((b, text_len, model_cfg.text_dim), f32), spec((b, text_len), bool),
                           spec((b, text_len, model_cfg.text_dim), f32), spec((b, text_len), bool), spec((b,), bool))
        source = None if layout.source_grid is None else spec((b,) + layout.source_grid + (model_cfg.bits,), f32)
        k = len(layout.schedule)
        rep = NamedSharding(self.mesh, P())
        sampling = ScaleSampling(*(jax.ShapeDtypeStruct(s, d, sharding=rep) for s, d in
                                   (((k,), f32), ((k,), f32), ((k,), f32), ((), jnp.int32), ((), f32))))
        with jax.set_mesh(self.mesh):
            return _sample_jit.lower(self.graphdef, self.state, layout, texts, source,
                                     jax.ShapeDtypeStruct((), jnp.uint32, sharding=rep), spec((b,), jnp.int32),
                                     sampling, spec((b, layout.n_target, model_cfg.bits), jnp.uint8),
                                     spec((b,), bool), with_logits=with_logits, mesh=self.mesh)


def sample(model: transformer.Infinity, layout: conditioning.SequenceLayout, text_feats, text_mask, source=None, *,
           mesh: jax.sharding.Mesh | None = None, **kwargs) -> SampleOutput:
    """One-off `Sampler.from_model(model, mesh).sample(layout, ...)` (keywords as `Sampler.sample`); keep a Sampler
    to reuse the placed parameters."""
    return Sampler.from_model(model, mesh).sample(layout, text_feats, text_mask, source, **kwargs)


def size_class(config: ml_collections.ConfigDict, resolution: int | None) -> str:
    """The pn of a sampling run: that of `resolution` (256/512/1024) if given, else the config's pn."""
    if resolution is not None:
        return schedules.pn_for_resolution(int(resolution))
    if config.get("pn"):
        return config.pn
    raise ValueError("the checkpoint config has no pn (an imported official checkpoint?): pass a resolution "
                     f"({', '.join(map(str, schedules.RESOLUTION_TO_PN))})")


def compile_for_topology(config: ml_collections.ConfigDict, slice_name: str, *, batch: int,
                         resolution: int | None = None, template: str = "1.0", text_len: int | None = None,
                         data: int = -1, tensor: int = 1,
                         attention_impl: str | None = None) -> tuple[jax.stages.Compiled, float]:
    """AOT-compiles the sampler of a transformer config for a TPU slice (e.g. "v5p-8") on any host (libtpu, no
    TPU): abstract parameters placed by their logical names on a ("dcn", "data", "fsdp", "tensor") mesh of the slice.
    `text_len` defaults to the model's `text_max_len`. Returns (compiled, seconds); `compiled.memory_analysis()`
    gives per-device memory."""
    model_cfg = transformer.default_model_config(**dict(config.model.items()))
    if attention_impl is not None:
        model_cfg.attention_impl = attention_impl
    mesh = topology.make_mesh(slice_name, data=data, fsdp=1, tensor=tensor)
    abstract = nnx.eval_shape(lambda: transformer.Infinity(model_cfg, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    shardings = sharding.param_shardings(state, mesh)
    state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), state, shardings)
    sampler = Sampler(graphdef, state, mesh, abstract.cfg)
    layout = conditioning.sequence_layout(config.get("conditioning", "sar"),
                                          schedules.scale_schedule(template, size_class(config, resolution)),
                                          template)
    t0 = time.perf_counter()
    compiled = sampler.lower(layout, batch, text_len or model_cfg.text_max_len).compile()
    return compiled, time.perf_counter() - t0
