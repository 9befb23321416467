"""Official Infinity / VAREdit transformer state dicts <-> varedit_jax `transformer.Infinity` parameters.

Kinds `infinity` and `varedit` share the key set (VAREdit adds no parameters). Key table (`key_table`), one row
per tensor, used by both directions; Linear weights (out, in) <-> kernels (in, out):
  cfg_uncond (rows, Ct)                         <-> cfg_uncond (text_max_len, Ct)   (see below)
  pos_start (1, 1, C)                           <-> pos_start (C,)
  text_norm.weight                              <-> text_norm.weight
  text_proj_for_sos.ca.mat_q (1, Hp, C/Hp)      <-> text_proj_for_sos.mat_q (Hp, C/Hp)
  text_proj_for_sos.ca.mat_kv.weight (2C, Ct)   <-> text_proj_for_sos.mat_kv (Ct, 2, C)   rows [k | v]
  text_proj_for_sos.ca.{v_bias, proj.*}         <-> text_proj_for_sos.{v_bias, proj.*}
  text_proj_for_ca.{0,2}.*                      <-> text_proj_for_ca.{0,1}.*
  lvl_embed.weight, word_embed.*, head.*        <-> lvl_embed.embedding, word_embed.*, head.*
  shared_ada_lin.1.{weight (6C, C), bias}       <-> shared_ada_lin (C, 6, C), shared_ada_bias (6, C)
  head_nm.ada_lin.1.{weight (2C, C), bias}      <-> head_nm.ada_lin (C, 2, C), head_nm.ada_bias (2, C)
  per block b, prefix `block_chunks.{c}.module.{j}.` (b = c * depth/block_chunks + j; `blocks.{b}.` when
  block_chunks = 1) <-> blocks[b] (looped) or blocks[...][b] (stacked, `scan_layers`):
    ada_gss (1, 1, 6, C) <-> ada_gss (6, C); sa.scale_mul_1H11 (1, H, 1, 1) <-> sa.scale_mul (H,)
    sa.mat_qkv.weight (3C, C) <-> sa.mat_qkv (C, 3, C) rows [q | k | v]; sa.{q_bias, v_bias, proj.*}
    ca.mat_kv.weight (2C, C) <-> ca.mat_kv (C, 2, C); ca.{mat_q.*, v_bias, proj.*}; ffn.{fc1,fc2}.*; ca_norm.*
  buffers text_proj_for_sos.ca.zero_k_bias, blocks' sa.zero_k_bias / ca.zero_k_bias: zeros (C,), emitted on
  export, required to be zero on import.
22 + 21 * depth tensors. `cfg_uncond`: the model keeps text_max_len rows; export pads with zeros to
`cfg_uncond_export_rows` (512 in the configs, what the official loader expects; an import without a config keeps
the file's row count so import -> export is exact); importing a file with more rows than the config's
text_max_len truncates like the official `Infinity.load_state_dict`.
Architecture (depth, block_chunks, embed_dim, num_heads, mlp_dim, bits, text_dim, text_pool_heads, text_max_len,
num_levels; patchify from d = 56) is inferred from the weights; a given config supplies the rest and is checked.
"""
import json
import pathlib
import re

import jax
import ml_collections
import numpy as np
from flax import nnx

from varedit_jax import configlib, state_dicts, transformer
from varedit_jax import params as params_lib
from varedit_jax import sharding as sharding_lib
from varedit_jax.params import get_path, set_path

KINDS = ("infinity", "varedit")
NESTED = (("trainer", "gpt_fsdp"), ("gpt_fsdp",), ("model",), ("state_dict",))
ARCH_FIELDS = ("embed_dim", "depth", "num_heads", "mlp_dim", "bits", "text_dim", "text_pool_heads", "num_levels",
               "block_chunks")
PATCHIFIED_BITS = 56  # the official d56 tokenizer: 14 channels, 2x2 pixel-unshuffled

# Official constructor flags this implementation reproduces (fixture config.json `constructor_kwargs`).
SUPPORTED_FLAGS = dict(shared_aln=True, head_aln=True, cos_attn=True, swiglu=False, rms_norm=False, nm0=False,
                       head_depth=1, tau=1, use_bit_label=1, add_lvl_embeding_only_first_block=1,
                       rope2d_each_sa_layer=1, rope2d_normalized_by_hw=2)

# (official key or block-relative suffix, param path, how): "linear" = transpose; "split" = (n*C, Cin) <-> (Cin, n, C);
# "flat" = (n*C,) <-> (n, C); "vector" = same; "squeeze" = the official tensor adds unit axes.
_TOP = (
    ("pos_start", ("pos_start",), "squeeze"),
    ("text_norm.weight", ("text_norm", "weight"), "vector"),
    ("text_proj_for_sos.ca.mat_q", ("text_proj_for_sos", "mat_q"), "squeeze"),
    ("text_proj_for_sos.ca.v_bias", ("text_proj_for_sos", "v_bias"), "vector"),
    ("text_proj_for_sos.ca.mat_kv.weight", ("text_proj_for_sos", "mat_kv"), "split"),
    ("text_proj_for_sos.ca.proj.weight", ("text_proj_for_sos", "proj", "kernel"), "linear"),
    ("text_proj_for_sos.ca.proj.bias", ("text_proj_for_sos", "proj", "bias"), "vector"),
    ("text_proj_for_ca.0.weight", ("text_proj_for_ca", 0, "kernel"), "linear"),
    ("text_proj_for_ca.0.bias", ("text_proj_for_ca", 0, "bias"), "vector"),
    ("text_proj_for_ca.2.weight", ("text_proj_for_ca", 1, "kernel"), "linear"),
    ("text_proj_for_ca.2.bias", ("text_proj_for_ca", 1, "bias"), "vector"),
    ("lvl_embed.weight", ("lvl_embed", "embedding"), "vector"),
    ("word_embed.weight", ("word_embed", "kernel"), "linear"),
    ("word_embed.bias", ("word_embed", "bias"), "vector"),
    ("shared_ada_lin.1.weight", ("shared_ada_lin",), "split"),
    ("shared_ada_lin.1.bias", ("shared_ada_bias",), "flat"),
    ("head_nm.ada_lin.1.weight", ("head_nm", "ada_lin"), "split"),
    ("head_nm.ada_lin.1.bias", ("head_nm", "ada_bias"), "flat"),
    ("head.weight", ("head", "kernel"), "linear"),
    ("head.bias", ("head", "bias"), "vector"),
)
_BLOCK = (
    ("ada_gss", ("ada_gss",), "squeeze"),
    ("sa.scale_mul_1H11", ("sa", "scale_mul"), "squeeze"),
    ("sa.q_bias", ("sa", "q_bias"), "vector"),
    ("sa.v_bias", ("sa", "v_bias"), "vector"),
    ("sa.mat_qkv.weight", ("sa", "mat_qkv"), "split"),
    ("sa.proj.weight", ("sa", "proj", "kernel"), "linear"),
    ("sa.proj.bias", ("sa", "proj", "bias"), "vector"),
    ("ca.v_bias", ("ca", "v_bias"), "vector"),
    ("ca.mat_q.weight", ("ca", "mat_q", "kernel"), "linear"),
    ("ca.mat_q.bias", ("ca", "mat_q", "bias"), "vector"),
    ("ca.mat_kv.weight", ("ca", "mat_kv"), "split"),
    ("ca.proj.weight", ("ca", "proj", "kernel"), "linear"),
    ("ca.proj.bias", ("ca", "proj", "bias"), "vector"),
    ("ffn.fc1.weight", ("ffn", "fc1", "kernel"), "linear"),
    ("ffn.fc1.bias", ("ffn", "fc1", "bias"), "vector"),
    ("ffn.fc2.weight", ("ffn", "fc2", "kernel"), "linear"),
    ("ffn.fc2.bias", ("ffn", "fc2", "bias"), "vector"),
    ("ca_norm.weight", ("ca_norm", "weight"), "vector"),
    ("ca_norm.bias", ("ca_norm", "bias"), "vector"),
)
_ZERO_BUFFERS_TOP = ("text_proj_for_sos.ca.zero_k_bias",)
_ZERO_BUFFERS_BLOCK = ("sa.zero_k_bias", "ca.zero_k_bias")


def block_prefix(b: int, depth: int, block_chunks: int) -> str:
    """Official key prefix of block b."""
    if block_chunks == 1:
        return f"blocks.{b}."
    per = depth // block_chunks
    return f"block_chunks.{b // per}.module.{b % per}."


def official_key(path: tuple) -> tuple[str, str]:
    """(official key, how) of a parameter path; block parameters (`("blocks", [index,] ...)`, stacked or looped) give
    the block-relative key. KeyError for a path that is not in the key table."""
    path = tuple(int(k) if isinstance(k, str) and k.isdigit() else k for k in path)
    if path == ("cfg_uncond",):
        return "cfg_uncond", "vector"
    if path[0] == "blocks":
        rest = path[2:] if isinstance(path[1], int) else path[1:]
        rows = {p: (name, how) for name, p, how in _BLOCK}
    else:
        rest, rows = path, {p: (name, how) for name, p, how in _TOP}
    if rest not in rows:
        raise KeyError(f"parameter {'/'.join(map(str, path))} is not in the official key table")
    return rows[rest]


def _official_shapes(m: ml_collections.ConfigDict) -> dict[str, tuple[int, ...]]:
    """Official key -> shape (buffers included; cfg_uncond with `cfg_uncond_export_rows` rows)."""
    c, ct, hp = m.embed_dim, m.text_dim, m.text_pool_heads
    rows = max(m.cfg_uncond_export_rows, m.text_max_len)
    shapes = {
        "cfg_uncond": (rows, ct), "pos_start": (1, 1, c), "text_norm.weight": (ct,),
        "text_proj_for_sos.ca.mat_q": (1, hp, c // hp), "text_proj_for_sos.ca.v_bias": (c,),
        "text_proj_for_sos.ca.zero_k_bias": (c,), "text_proj_for_sos.ca.mat_kv.weight": (2 * c, ct),
        "text_proj_for_sos.ca.proj.weight": (c, c), "text_proj_for_sos.ca.proj.bias": (c,),
        "text_proj_for_ca.0.weight": (c, ct), "text_proj_for_ca.0.bias": (c,),
        "text_proj_for_ca.2.weight": (c, c), "text_proj_for_ca.2.bias": (c,),
        "lvl_embed.weight": (m.num_levels, c), "word_embed.weight": (c, m.bits), "word_embed.bias": (c,),
        "shared_ada_lin.1.weight": (6 * c, c), "shared_ada_lin.1.bias": (6 * c,),
        "head_nm.ada_lin.1.weight": (2 * c, c), "head_nm.ada_lin.1.bias": (2 * c,),
        "head.weight": (2 * m.bits, c), "head.bias": (2 * m.bits,),
    }
    block = {
        "ada_gss": (1, 1, 6, c), "sa.scale_mul_1H11": (1, m.num_heads, 1, 1), "sa.q_bias": (c,), "sa.v_bias": (c,),
        "sa.zero_k_bias": (c,), "sa.mat_qkv.weight": (3 * c, c), "sa.proj.weight": (c, c), "sa.proj.bias": (c,),
        "ca.v_bias": (c,), "ca.zero_k_bias": (c,), "ca.mat_q.weight": (c, c), "ca.mat_q.bias": (c,),
        "ca.mat_kv.weight": (2 * c, c), "ca.proj.weight": (c, c), "ca.proj.bias": (c,),
        "ffn.fc1.weight": (m.mlp_dim, c), "ffn.fc1.bias": (m.mlp_dim,), "ffn.fc2.weight": (c, m.mlp_dim),
        "ffn.fc2.bias": (c,), "ca_norm.weight": (c,), "ca_norm.bias": (c,),
    }
    for b in range(m.depth):
        prefix = block_prefix(b, m.depth, m.block_chunks)
        shapes.update({prefix + k: s for k, s in block.items()})
    return shapes


def _to_official(x: np.ndarray, how: str, shape: tuple[int, ...]) -> np.ndarray:
    """Parameter -> official tensor of `shape`."""
    if how == "linear":
        return np.ascontiguousarray(x.T)
    if how == "split":
        return np.ascontiguousarray(x.reshape(x.shape[0], -1).T)
    return np.ascontiguousarray(x.reshape(shape))


def _official_view(x: np.ndarray, how: str, shape: tuple[int, ...]) -> np.ndarray:
    """Official tensor -> the parameter of `shape` as a view of it (no copy, dtype kept)."""
    if how == "linear":
        return x.T
    if how == "split":
        return x.T.reshape(shape)
    return x.reshape(shape)


def _from_official(x: np.ndarray, how: str, shape: tuple[int, ...]) -> np.ndarray:
    """Official tensor -> float32 parameter of `shape`."""
    return np.ascontiguousarray(_official_view(np.asarray(x, np.float32), how, shape))




def _stacked(params) -> bool:
    return "ada_gss" in params["blocks"]


# ----------------------------------------------------------------------------------------------------------------
# Architecture inference
# ----------------------------------------------------------------------------------------------------------------

def infer_model_config(sd: dict[str, np.ndarray], what: str) -> ml_collections.ConfigDict:
    """Shape-determined fields from an official state dict; the rest are the official defaults."""
    required = ("pos_start", "word_embed.weight", "text_norm.weight", "cfg_uncond", "lvl_embed.weight",
                "text_proj_for_sos.ca.mat_q")
    state_dicts.require_keys(sd, required, what, "an Infinity/VAREdit transformer")
    chunked = {(int(m.group(1)), int(m.group(2))) for k in sd
               if (m := re.match(r"block_chunks\.(\d+)\.module\.(\d+)\.", k))}
    flat = {int(m.group(1)) for k in sd if (m := re.match(r"blocks\.(\d+)\.", k))}
    if chunked and flat:
        raise state_dicts.StateDictMismatch(f"{what}: mixes `blocks.*` and `block_chunks.*` key names")
    if chunked:
        block_chunks = max(c for c, _ in chunked) + 1
        depth = block_chunks * (max(j for _, j in chunked) + 1)
    elif flat:
        block_chunks, depth = 1, max(flat) + 1
    else:
        raise state_dicts.StateDictMismatch(f"{what}: no transformer blocks (`block_chunks.*` / `blocks.*`) found")
    first = block_prefix(0, depth, block_chunks)
    for key in (first + "sa.scale_mul_1H11", first + "ffn.fc1.weight"):
        if key not in sd:
            raise state_dicts.StateDictMismatch(f"{what}: missing key {key!r}")
    bits = int(sd["word_embed.weight"].shape[1])
    return transformer.default_model_config(
        embed_dim=int(sd["pos_start"].shape[-1]), depth=depth, num_heads=int(sd[first + "sa.scale_mul_1H11"].shape[1]),
        mlp_dim=int(sd[first + "ffn.fc1.weight"].shape[0]), bits=bits, text_dim=int(sd["text_norm.weight"].shape[0]),
        text_max_len=int(sd["cfg_uncond"].shape[0]), text_pool_heads=int(sd["text_proj_for_sos.ca.mat_q"].shape[1]),
        num_levels=int(sd["lvl_embed.weight"].shape[0]), block_chunks=block_chunks,
        cfg_uncond_export_rows=int(sd["cfg_uncond"].shape[0]), patchify=bits == PATCHIFIED_BITS)


def _check_against(given: ml_collections.ConfigDict, inferred: ml_collections.ConfigDict, what: str) -> None:
    bad = [f"{f}: config {given[f]} vs weights {inferred[f]}" for f in ARCH_FIELDS if given[f] != inferred[f]]
    if given.text_max_len > inferred.text_max_len:
        bad.append(f"text_max_len: config {given.text_max_len} > the {inferred.text_max_len} rows of cfg_uncond")
    state_dicts.require_match(bad, what)


# ----------------------------------------------------------------------------------------------------------------
# Family interface (see varedit_jax/convert/__init__.py)
# ----------------------------------------------------------------------------------------------------------------

def _full_config(kind: str, model_cfg, conditioning: str | None = None, extra: dict | None = None):
    if kind not in KINDS:
        raise ValueError(f"convert.infinity handles kinds {KINDS}, got {kind!r}")
    conditioning = conditioning or ("sar" if kind == "varedit" else "none")
    if (kind == "infinity") != (conditioning == "none"):
        raise ValueError(f"kind {kind!r} does not go with conditioning {conditioning!r}")
    config = ml_collections.ConfigDict({"kind": kind, "conditioning": conditioning, "model": model_cfg.to_dict()})
    for key, value in (extra or {}).items():
        config[key] = value
    return config


def model_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    model = config.model if "model" in config else config
    return transformer.default_model_config(**dict(model.items()))


def import_weights(src, config: ml_collections.ConfigDict | None = None, *, kind: str = "varedit"):
    """Official weights (file / HF folder / nested trainer .pth / a state dict) -> (config, params)."""
    what = "state dict" if isinstance(src, dict) else str(src)
    sd = dict(src) if isinstance(src, dict) else state_dicts.read_state_dict(src, nested=NESTED)
    inferred = infer_model_config(sd, what)
    if config is not None:
        model_cfg = model_config(config)
        _check_against(model_cfg, inferred, what)
        conditioning = config.get("conditioning")
        extra = {k: v for k, v in config.items() if k not in ("kind", "conditioning", "model")}
    else:
        model_cfg, conditioning, extra = inferred, None, {}
    transformer.validate_config(model_cfg)
    expected = _official_shapes(inferred)
    state_dicts.check_state_dict(sd, expected, what)
    nonzero = [k for k in sd if k.endswith("zero_k_bias") and np.any(np.asarray(sd[k]) != 0)]
    if nonzero:
        raise state_dicts.StateDictMismatch(f"{what}: buffers that must be zero are not: {nonzero[:5]}")
    top_shapes, block_shapes = param_shapes(model_cfg)
    params: dict = {}
    set_path(params, ("cfg_uncond",), np.ascontiguousarray(np.asarray(sd["cfg_uncond"], np.float32)
                                                       [:model_cfg.text_max_len]))
    for name, path, how in _TOP:
        set_path(params, path, _from_official(sd[name], how, get_path(top_shapes, path)))
    prefixes = [block_prefix(b, model_cfg.depth, model_cfg.block_chunks) for b in range(model_cfg.depth)]
    for name, path, how in _BLOCK:  # one tensor name at a time: peak memory ~ the state dict + the params
        per_block = [_from_official(sd[prefix + name], how, get_path(block_shapes, path)) for prefix in prefixes]
        if model_cfg.scan_layers:
            set_path(params, ("blocks",) + path, np.stack(per_block))
        else:
            for b, value in enumerate(per_block):
                set_path(params, ("blocks", b) + path, value)
    return _full_config(kind, model_cfg, conditioning, extra), params


def import_sharded(src, target: dict) -> tuple[dict, list[str]]:
    """Official weights -> the parameters of `target` (a param tree of ShapeDtypeStructs with shardings) whose path
    and shape the file has, as global arrays read tensor by tensor and placed shard by shard
    (`sharding.assemble`): host memory holds one official tensor and this process's shards of one parameter, never
    the model. Returns ({"a/b/c": array}, the paths left out with why); `cfg_uncond` keeps the target's rows."""
    what = str(src)
    sd = state_dicts.open_state_dict(src, nested=NESTED)
    m = infer_model_config(sd, what)
    expected = _official_shapes(m)
    state_dicts.check_shapes(sd, expected, what)
    if any(np.any(sd[k].read() != 0) for k in sd if k.endswith("zero_k_bias")):
        raise state_dicts.StateDictMismatch(f"{what}: buffers that must be zero are not")
    top_shapes, block_shapes = param_shapes(m)
    prefixes = [block_prefix(b, m.depth, m.block_chunks) for b in range(m.depth)]

    def read(name: str, how: str, shape) -> np.ndarray:
        x = sd[name].read()
        state_dicts.check_values({name: x}, what)
        return _official_view(x, how, shape)

    loaded, dropped = {}, []
    for name, leaf in params_lib.flat_leaves(target).items():
        path = tuple(int(k) if k.isdigit() else k for k in name.split("/"))
        try:
            key, how = official_key(path)
        except KeyError:
            dropped.append(f"{name} (not in the file)")
            continue
        shape, stacked = tuple(leaf.shape), False
        if path == ("cfg_uncond",):
            have = (m.text_max_len, m.text_dim)
            ok = shape[1] == have[1] and shape[0] <= have[0]
            sources = [lambda: read("cfg_uncond", how, have)[:shape[0]]]
        elif path[0] == "blocks" and isinstance(path[1], int):  # looped blocks: blocks/<b>/...
            ok = path[1] < m.depth and shape == get_path(block_shapes, path[2:])
            sources = [lambda: read(prefixes[path[1]] + key, how, shape)]
        elif path[0] == "blocks":  # stacked blocks: (depth, ...)
            ok, stacked = shape == (m.depth, *get_path(block_shapes, path[1:])), True
            sources = [lambda p=p: read(p + key, how, shape[1:]) for p in prefixes]
        else:
            ok = shape == get_path(top_shapes, path)
            sources = [lambda: read(key, how, shape)]
        if not ok:
            dropped.append(f"{name} {shape} (the file's model differs)")
            continue
        loaded[name] = sharding_lib.assemble(shape, leaf.dtype, leaf.sharding, _filler(sources, stacked=stacked))
    return loaded, dropped


def _filler(sources, *, stacked: bool):
    """`sharding.assemble`'s fill over official tensors: `sources` are readers of the whole parameter, or of each
    block of a stacked one (each read once, written into every shard that holds it)."""
    def fill(shards):
        if not stacked:
            x = sources[0]()
            for index, out in shards:
                out[...] = x[index]
            return
        for b, source in enumerate(sources):
            holding = [(index, out) for index, out in shards if index[0].start <= b < index[0].stop]
            if holding:
                x = source()
                for index, out in holding:
                    out[b - index[0].start] = x[index[1:]]
    return fill


def param_shapes(m: ml_collections.ConfigDict) -> tuple[dict, dict]:
    """(shapes of the non-block parameters, shapes of one block's parameters), from an abstract model."""
    one = transformer.default_model_config(**{**dict(m.items()), "depth": 1, "block_chunks": 1, "scan_layers": False})
    abstract = nnx.eval_shape(lambda: transformer.Infinity(one, rngs=nnx.Rngs(0)))
    shapes = jax.tree.map(lambda a: tuple(a.shape), transformer.param_dict(abstract))
    return shapes, shapes.pop("blocks")[0]


def export_weights(config: ml_collections.ConfigDict, params) -> dict[str, np.ndarray]:
    """Params (stacked or looped blocks; list indices int or str) -> the exact official state dict (float32)."""
    m = model_config(config)
    expected = _official_shapes(m)

    def fetch(path):
        return state_dicts.fetch_param(params, path)

    out = {}
    uncond = fetch(("cfg_uncond",))
    rows = expected["cfg_uncond"][0]
    out["cfg_uncond"] = np.concatenate([uncond, np.zeros((rows - uncond.shape[0], uncond.shape[1]), np.float32)])
    for name, path, how in _TOP:
        out[name] = _to_official(fetch(path), how, expected[name])
    stacked = _stacked(params)
    for b in range(m.depth):
        prefix = block_prefix(b, m.depth, m.block_chunks)
        for name, path, how in _BLOCK:
            value = fetch(("blocks",) + path)[b] if stacked else fetch(("blocks", b) + path)
            out[prefix + name] = _to_official(value, how, expected[prefix + name])
    for name in _ZERO_BUFFERS_TOP:
        out[name] = np.zeros(expected[name], np.float32)
    for b in range(m.depth):
        for name in _ZERO_BUFFERS_BLOCK:
            key = block_prefix(b, m.depth, m.block_chunks) + name
            out[key] = np.zeros(expected[key], np.float32)
    state_dicts.check_state_dict(out, expected, "exported transformer")
    return out


# Model fields <-> official constructor arguments that carry them one to one (`bundle.constructor_kwargs` writes the
# rest: the released flag set, mlp_ratio, patchify, text_maxlen = the rows of the exported cfg_uncond).
CONSTRUCTOR_FIELDS = (("embed_dim", "embed_dim"), ("depth", "depth"), ("num_heads", "num_heads"),
                      ("text_dim", "text_channels"), ("norm_eps", "norm_eps"), ("block_chunks", "block_chunks"),
                      ("drop_path_rate", "drop_path_rate"))


def config_from_constructor(data: dict, path: pathlib.Path, kind: str) -> ml_collections.ConfigDict:
    """`constructor_kwargs` of the official Infinity class + what they leave open -> ConfigDict. Reads a fixture
    config.json (bits from `derived.d_vae` / `vae_local.embed_dim`) and an export bundle's model.json (bits from
    `image_tokenizer.vae_type`; the trained `text_max_len`, `conditioning` and `pn` beside the arguments)."""
    kwargs = data.get("constructor_kwargs")
    if not isinstance(kwargs, dict):
        raise ValueError(f"{path}: expected `constructor_kwargs` (official Infinity arguments) or `model`")
    unsupported = {k: kwargs[k] for k, v in SUPPORTED_FLAGS.items() if k in kwargs and kwargs[k] != v}
    if float(kwargs.get("cross_attn_layer_scale", -1.0)) >= 0:
        unsupported["cross_attn_layer_scale"] = kwargs["cross_attn_layer_scale"]
    if unsupported:
        raise ValueError(f"{path}: official flags not implemented here: {unsupported}")
    fields = {ours: kwargs[theirs] for ours, theirs in CONSTRUCTOR_FIELDS if theirs in kwargs}
    if "text_maxlen" in kwargs:
        fields["text_max_len"] = int(data.get("text_max_len", kwargs["text_maxlen"]))
        fields["cfg_uncond_export_rows"] = int(kwargs["text_maxlen"])
    if "embed_dim" in kwargs:
        fields["mlp_dim"] = transformer.official_mlp_dim(kwargs["embed_dim"], kwargs.get("mlp_ratio", 4.0))
    if "apply_spatial_patchify" in kwargs:
        fields["patchify"] = bool(kwargs["apply_spatial_patchify"])
    derived, tokenizer = data.get("derived", {}), data.get("image_tokenizer") or {}
    per_token = 4 if fields.get("patchify") else 1
    if "d_vae" in derived:
        fields["bits"] = int(derived["d_vae"])
    elif "embed_dim" in data.get("vae_local", {}):
        fields["bits"] = int(data["vae_local"]["embed_dim"]) * per_token
    elif "vae_type" in tokenizer:
        fields["bits"] = int(tokenizer["vae_type"]) * per_token
    if "text_pool_heads" in derived:
        fields["text_pool_heads"] = int(derived["text_pool_heads"])
    model_cfg = transformer.default_model_config(**fields)
    pn = data.get("pn", kwargs.get("pn"))
    extra = {"pn": pn} if isinstance(pn, str) and pn in ("0.06M", "0.25M", "0.60M", "1M") else {}
    return _full_config(kind, model_cfg, data.get("conditioning"), extra)


def config_from_file(path, *, kind: str = "varedit") -> ml_collections.ConfigDict:
    """ConfigDict(kind, conditioning, model, ...) from a configs/*.py file, a checkpoint's stored config JSON
    (with `model`), a fixture config.json or an export bundle's model.json (`constructor_kwargs`)."""
    path = pathlib.Path(str(path).partition(":")[0]) if str(path).endswith(".json") else path
    if str(path).endswith(".json"):
        if not path.is_file():
            raise FileNotFoundError(f"config file {path} does not exist")
        data = json.loads(path.read_text())
        if "model" in data:
            config = _full_config(kind, model_config(ml_collections.ConfigDict(data)), data.get("conditioning"))
        else:
            config = config_from_constructor(data, path, kind)
    else:
        loaded = configlib.load(path)
        if loaded.get("kind") not in KINDS:
            raise ValueError(f"{path} is a {loaded.get('kind')!r} config, not a transformer ({KINDS})")
        if loaded.kind != kind:
            raise ValueError(f"{path} is a {loaded.kind!r} config, not {kind!r}")
        extra = {k: v for k, v in loaded.items() if k not in ("kind", "conditioning", "model")}
        config = _full_config(kind, model_config(loaded), loaded.get("conditioning"), extra)
    transformer.validate_config(config.model)
    return config
