"""Official BSQ tokenizer weights (Infinity `AutoEncoder` state dicts) <-> varedit_jax `ImageTokenizer` parameters.

Key table (`key_table`), one row per tensor, used by both directions (HWIO kernels <-> OIHW weights):
  encoder.conv_in.{kernel,bias}                   <-> encoder.conv_in.conv.{weight,bias}
  encoder.down[i].block[j].norm1.{scale,bias}     <-> encoder.down.i.block.j.norm1.norm.{weight,bias}  (norm2 too)
  encoder.down[i].block[j].conv1.{kernel,bias}    <-> encoder.down.i.block.j.conv1.conv.{weight,bias}  (conv2,
                                                      nin_shortcut when the width changes)
  encoder.down[i].downsample.conv.*               <-> encoder.down.i.downsample.conv.conv.*
  encoder.mid.block_{1,2}.*, encoder.norm_out.*, encoder.conv_out.*  (same pattern)
  decoder.conv_in / mid / up[i].block[j] / up[i].upsample.conv / norm_out / conv_out  (same pattern)
  (buffers) quantizer.lfq.mask, quantize.lfq.mask  int64 (d,) = 2**(d-1-j): emitted on export, checked if present
Official files come flat or nested under ['vae'] / ['ema'] (.pth, weights_only) or as safetensors, in the wrapped
spelling above or the "unwrapped" one the official `load_cnn` also accepts (`X.weight` for `X.conv.weight` of a conv,
`X.weight` for `X.norm.weight` of a GroupNorm). The architecture is inferred from key names and shapes; a given
config is checked against it. Anything else in the file is refused (missing / unexpected keys, first shape mismatch).
"""
import json
import pathlib
import re

import ml_collections
import numpy as np

from varedit_jax import configlib, image_tokenizer, state_dicts

KIND = image_tokenizer.KIND
NESTED = (("vae",), ("ema",))
MASK_KEYS = ("quantizer.lfq.mask", "quantize.lfq.mask")
ARCH_FIELDS = ("base_ch", "ch_mult", "num_res_blocks", "patch_size", "codebook_dim")
_CONV_MODULE = re.compile(r"(^|\.)(conv_in|conv_out|conv1|conv2|nin_shortcut|(downsample|upsample)\.conv)$")
_NORM_MODULE = re.compile(r"(^|\.)(norm1|norm2|norm_out)$")


# ----------------------------------------------------------------------------------------------------------------
# The key table
# ----------------------------------------------------------------------------------------------------------------

def key_table(model_cfg: ml_collections.ConfigDict) -> list[tuple[tuple, str, str, tuple[int, ...]]]:
    """Rows (param path, official key, kind, official shape) in official state_dict order; kind is 'conv'
    (HWIO kernel <-> OIHW weight) or 'vector'."""
    rows = []

    def conv(path, name, c_in, c_out, k=3):
        rows.extend([(path + ("kernel",), f"{name}.conv.weight", "conv", (c_out, c_in, k, k)),
                     (path + ("bias",), f"{name}.conv.bias", "vector", (c_out,))])

    def norm(path, name, c):
        rows.extend([(path + ("scale",), f"{name}.norm.weight", "vector", (c,)),
                     (path + ("bias",), f"{name}.norm.bias", "vector", (c,))])

    def resblock(path, name, c_in, c_out):
        norm(path + ("norm1",), f"{name}.norm1", c_in)
        conv(path + ("conv1",), f"{name}.conv1", c_in, c_out)
        norm(path + ("norm2",), f"{name}.norm2", c_out)
        conv(path + ("conv2",), f"{name}.conv2", c_out, c_out)
        if c_in != c_out:
            conv(path + ("nin_shortcut",), f"{name}.nin_shortcut", c_in, c_out, 1)

    base, d = model_cfg.base_ch, model_cfg.codebook_dim
    widths = [base * m for m in model_cfg.ch_mult]
    n_down = image_tokenizer.num_downsamples(model_cfg.patch_size)
    n_blocks = model_cfg.num_res_blocks
    conv(("encoder", "conv_in"), "encoder.conv_in", 3, base)
    for i, width in enumerate(widths):
        c_in = ([base] + widths)[i]
        for j in range(n_blocks):
            resblock(("encoder", "down", i, "block", j), f"encoder.down.{i}.block.{j}", c_in if j == 0 else width,
                     width)
        if i < n_down:
            conv(("encoder", "down", i, "downsample", "conv"), f"encoder.down.{i}.downsample.conv", width, width)
    for b in ("block_1", "block_2"):
        resblock(("encoder", "mid", b), f"encoder.mid.{b}", widths[-1], widths[-1])
    norm(("encoder", "norm_out"), "encoder.norm_out", widths[-1])
    conv(("encoder", "conv_out"), "encoder.conv_out", widths[-1], d)
    conv(("decoder", "conv_in"), "decoder.conv_in", d, widths[-1])
    for b in ("block_1", "block_2"):
        resblock(("decoder", "mid", b), f"decoder.mid.{b}", widths[-1], widths[-1])
    for i, width in enumerate(widths):
        c_in = (widths + [widths[-1]])[i + 1]
        for j in range(n_blocks + 1):
            resblock(("decoder", "up", i, "block", j), f"decoder.up.{i}.block.{j}", c_in if j == 0 else width, width)
        if 1 <= i <= n_down:
            conv(("decoder", "up", i, "upsample", "conv"), f"decoder.up.{i}.upsample.conv", width, width)
    norm(("decoder", "norm_out"), "decoder.norm_out", widths[0])
    conv(("decoder", "conv_out"), "decoder.conv_out", widths[0], 3)
    return rows


def lfq_mask(d: int) -> np.ndarray:
    """The official (unused) int64 buffer 2**(d-1-j), j = 0..d-1."""
    return (2 ** np.arange(d - 1, -1, -1)).astype(np.int64)


def _to_official(x: np.ndarray, kind: str) -> np.ndarray:
    return np.ascontiguousarray(np.transpose(x, (3, 2, 0, 1))) if kind == "conv" else np.asarray(x)


def _from_official(x: np.ndarray, kind: str) -> np.ndarray:
    x = np.asarray(x, np.float32)
    return np.ascontiguousarray(np.transpose(x, (2, 3, 1, 0))) if kind == "conv" else x



def expected_shapes(model_cfg: ml_collections.ConfigDict) -> dict[str, tuple[int, ...]]:
    """Official key -> shape of every tensor of the architecture (masks included)."""
    shapes = {name: shape for _, name, _, shape in key_table(model_cfg)}
    shapes.update({k: (model_cfg.codebook_dim,) for k in MASK_KEYS})
    return shapes


# ----------------------------------------------------------------------------------------------------------------
# Spellings and architecture inference
# ----------------------------------------------------------------------------------------------------------------

def canonical_key(key: str) -> str:
    """Official wrapped spelling of a key: `X.weight` -> `X.conv.weight` for convs, `X.norm.weight` for GroupNorms."""
    module, _, leaf = key.rpartition(".")
    if leaf in ("weight", "bias"):
        if _CONV_MODULE.search(module):
            return f"{module}.conv.{leaf}"
        if _NORM_MODULE.search(module):
            return f"{module}.norm.{leaf}"
    return key


def canonicalize(state_dict: dict[str, np.ndarray], what: str) -> dict[str, np.ndarray]:
    """The state dict in the wrapped spelling; a tensor given in both spellings is refused."""
    out = {}
    for key, value in state_dict.items():
        name = canonical_key(key)
        if name in out:
            raise state_dicts.StateDictMismatch(f"{what}: {name!r} is given twice (wrapped and unwrapped spellings)")
        out[name] = value
    return out


def infer_model_config(sd: dict[str, np.ndarray], what: str) -> ml_collections.ConfigDict:
    """Architecture fields from a canonical state dict.

    `patchify` (a transformer-side option) is not in the weights: it follows the official releases, where the only
    stride-8 tokenizer (d56) is used with the 2x2 patchify; a given config overrides it.
    """
    required = ("encoder.conv_in.conv.weight", "encoder.conv_out.conv.weight",
                "encoder.down.0.block.0.conv1.conv.weight")
    state_dicts.require_keys(sd, required, what, "a BSQ tokenizer")
    base_ch = int(sd["encoder.conv_in.conv.weight"].shape[0])
    levels = sorted({int(m.group(1)) for k in sd if (m := re.match(r"encoder\.down\.(\d+)\.", k))})
    ch_mult = []
    for i in levels:
        key = f"encoder.down.{i}.block.0.conv1.conv.weight"
        if key not in sd or sd[key].shape[0] % base_ch:
            raise state_dicts.StateDictMismatch(f"{what}: cannot infer level {i} width from {key!r}")
        ch_mult.append(int(sd[key].shape[0]) // base_ch)
    n_blocks = len({m.group(1) for k in sd if (m := re.match(r"encoder\.down\.0\.block\.(\d+)\.", k))})
    n_down = sum(f"encoder.down.{i}.downsample.conv.conv.weight" in sd for i in levels)
    patch_size = 2 ** n_down
    d = int(sd["encoder.conv_out.conv.weight"].shape[0])
    return image_tokenizer.default_model_config(base_ch=base_ch, ch_mult=tuple(ch_mult), num_res_blocks=n_blocks,
                                          patch_size=patch_size, codebook_dim=d, patchify=patch_size == 8)


def _arch(cfg: ml_collections.ConfigDict) -> dict:
    return {f: tuple(cfg[f]) if f == "ch_mult" else cfg[f] for f in ARCH_FIELDS}


def _check_against(given: ml_collections.ConfigDict, inferred: ml_collections.ConfigDict, what: str) -> None:
    want, got = _arch(given), _arch(inferred)
    state_dicts.require_match([f"{f}: config {want[f]} vs weights {got[f]}" for f in ARCH_FIELDS if want[f] != got[f]],
                              what)


# ----------------------------------------------------------------------------------------------------------------
# Family interface (see varedit_jax/convert/__init__.py)
# ----------------------------------------------------------------------------------------------------------------

def _full_config(model_cfg: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict({"kind": KIND, "model": model_cfg.to_dict()})


def _model_config(config: ml_collections.ConfigDict) -> ml_collections.FrozenConfigDict:
    """The complete model config of a full config (kind + model) or of a model config."""
    return image_tokenizer.model_config(config.model if "model" in config else config)


def import_weights(src, config: ml_collections.ConfigDict | None = None, *, kind: str = KIND):
    """Official tokenizer weights (file / folder / a state dict) -> (ConfigDict(kind, model), params nested dict)."""
    if kind != KIND:
        raise ValueError(f"convert.image_tokenizer imports kind 'image_tokenizer', got {kind!r}")
    what = str(src) if not isinstance(src, dict) else "state dict"
    raw = src if isinstance(src, dict) else state_dicts.read_state_dict(src, nested=NESTED)
    sd = canonicalize(raw, what)
    inferred = infer_model_config(sd, what)
    if config is not None:
        model_cfg = _model_config(config)
        _check_against(model_cfg, inferred, what)
    else:
        model_cfg = inferred
    model_cfg = image_tokenizer.model_config(model_cfg)
    expected = expected_shapes(model_cfg)
    for key in MASK_KEYS:
        if key in sd and not np.array_equal(np.asarray(sd[key]), lfq_mask(model_cfg.codebook_dim)):
            raise state_dicts.StateDictMismatch(f"{what}: buffer {key!r} is not 2**(d-1-j) for d = {model_cfg.codebook_dim}")
    # The mask buffers are optional (unused; the official loader ignores them); everything else must match.
    state_dicts.check_state_dict(sd, {k: s for k, s in expected.items() if k not in MASK_KEYS or k in sd}, what,
                                 int_keys=MASK_KEYS)
    params: dict = {}
    for path, name, kind_, _ in key_table(model_cfg):
        node = params
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = _from_official(sd[name], kind_)
    return _full_config(model_cfg), params


def export_weights(config: ml_collections.ConfigDict, params) -> dict[str, np.ndarray]:
    """Params (nested dict, list indices int or str) -> the exact official state dict (fp32 + int64 masks).
    (A non-zero `norm_groups`, e.g. the toy tokenizer's, is not representable in the official class.)"""
    model_cfg = _model_config(config)
    out = {}
    for path, name, kind_, _ in key_table(model_cfg):
        out[name] = _to_official(state_dicts.fetch_param(params, path), kind_)
    for key in MASK_KEYS:
        out[key] = lfq_mask(model_cfg.codebook_dim)
    state_dicts.check_state_dict(out, expected_shapes(model_cfg), "exported tokenizer", int_keys=MASK_KEYS)
    return out


def config_from_file(path, *, kind: str = KIND) -> ml_collections.ConfigDict:
    """ConfigDict(kind='image_tokenizer', model=...) from a configs/*.py file, a stored checkpoint config.json, or a fixture
    config.json (`{"config": {base_ch, ch_mult, patch_size, codebook_dim, patchify}}`; num_res_blocks defaults to
    the official 2)."""
    spec, path = str(path), pathlib.Path(str(path).partition(":")[0])
    if path.suffix == ".json":
        if not path.is_file():
            raise FileNotFoundError(f"config file {path} does not exist")
        data = json.loads(path.read_text())
        fields = data["model"] if "model" in data else data.get("config")
        if not isinstance(fields, dict):
            raise ValueError(f"{path}: expected a 'model' or 'config' mapping of tokenizer fields")
        known = set(image_tokenizer.REQUIRED_FIELDS) | set(image_tokenizer.OPTIONAL_FIELDS)
        model_cfg = image_tokenizer.default_model_config(**{k: v for k, v in fields.items() if k in known})
    else:
        loaded = configlib.load(spec)
        if loaded.get("kind", kind) != kind:
            raise ValueError(f"{path} is a {loaded.kind!r} config, not {kind!r}")
        model_cfg = loaded.model
    return _full_config(image_tokenizer.model_config(model_cfg))
