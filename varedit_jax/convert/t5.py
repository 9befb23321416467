"""flan-T5 (T5 v1.1) encoders in the Hugging Face layout <-> varedit_jax `text.T5Encoder` parameters.

Key table (`key_table`), one row per tensor, used by both directions; Linear weights (out, in) <-> kernels (in, out);
block i of the HF names <-> index i of the stacked (num_layers, ...) block parameters:
  shared.weight (vocab, C)                                              <-> embed.embedding
  encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight  <-> relative_attention_bias (buckets, heads)
  encoder.block.{i}.layer.0.layer_norm.weight                           <-> blocks.attn_norm.weight[i]
  encoder.block.{i}.layer.0.SelfAttention.{q,k,v,o}.weight              <-> blocks.attn.{q,k,v,o}.kernel[i]
  encoder.block.{i}.layer.1.layer_norm.weight                           <-> blocks.ffn_norm.weight[i]
  encoder.block.{i}.layer.1.DenseReluDense.{wi_0,wi_1,wo}.weight        <-> blocks.ffn.{wi_0,wi_1,wo}.kernel[i]
  encoder.final_layer_norm.weight                                       <-> final_norm.weight
2 + 9 * num_layers + 1 tensors, float32 on export. Import also accepts a full encoder-decoder checkpoint (the
released `google/flan-t5-xl` folder): `decoder.*` and `lm_head.weight` are not part of the encoder and are ignored,
`encoder.embed_tokens.weight` must equal `shared.weight` (tied). Anything else is refused with the named keys.

Sources: a Hugging Face folder (`config.json`, `model.safetensors` or shards + `model.safetensors.index.json`,
`spiece.model`) or a safetensors file with `config.json` and `spiece.model` beside it. The shapes (vocab, width,
d_kv, heads, d_ff, layers, buckets) are inferred from the weights and checked against `config.json` and a given
config (a `configs/*.py`, an HF `config.json` or a stored checkpoint config), which supply the rest (max_distance,
eps, feed_forward_proj, compute dtype, text_max_len).

The stored checkpoint config is `text.encoder_config`: `kind` "t5", `model`, `text_max_len` (static token length,
official 512) and `spiece_proto` = the sentencepiece model (base64). The tokenizer travels INSIDE the checkpoint (about
1 MB for flan-T5), so a checkpoint loads with no other file; `save_hf_folder` writes it back as `spiece.model`.
"""
import json
import logging
import pathlib
import re

import jax
import ml_collections
import numpy as np

from varedit_jax import configlib, state_dicts, text
from varedit_jax.params import get_path, set_path

KIND = text.KIND
# Inferred from the weights.
ARCH_FIELDS = ("vocab_size", "d_model", "d_kv", "num_heads", "d_ff", "num_layers", "relative_attention_num_buckets")
# Described by an HF config.json (the architecture plus what the weights cannot tell).
HF_FIELDS = ARCH_FIELDS + ("relative_attention_max_distance", "layer_norm_epsilon", "feed_forward_proj")
HF_DEFAULTS = dict(relative_attention_max_distance=128, layer_norm_epsilon=1e-6, feed_forward_proj="relu")
SHARED, REL_BIAS, FINAL_NORM = ("shared.weight", "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight",
                                "encoder.final_layer_norm.weight")
TIED_EMBED = "encoder.embed_tokens.weight"
_NOT_ENCODER = re.compile(r"^(decoder\.|lm_head\.weight$)")
# (HF suffix after `encoder.block.{i}.`, param path inside `blocks`, transpose)
_BLOCK = (
    ("layer.0.layer_norm.weight", ("attn_norm", "weight"), False),
    ("layer.0.SelfAttention.q.weight", ("attn", "q", "kernel"), True),
    ("layer.0.SelfAttention.k.weight", ("attn", "k", "kernel"), True),
    ("layer.0.SelfAttention.v.weight", ("attn", "v", "kernel"), True),
    ("layer.0.SelfAttention.o.weight", ("attn", "o", "kernel"), True),
    ("layer.1.layer_norm.weight", ("ffn_norm", "weight"), False),
    ("layer.1.DenseReluDense.wi_0.weight", ("ffn", "wi_0", "kernel"), True),
    ("layer.1.DenseReluDense.wi_1.weight", ("ffn", "wi_1", "kernel"), True),
    ("layer.1.DenseReluDense.wo.weight", ("ffn", "wo", "kernel"), True),
)
log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------------------------------
# The key table
# ----------------------------------------------------------------------------------------------------------------

def key_table(m: ml_collections.ConfigDict) -> list[tuple[tuple, int | None, str, bool]]:
    """Rows (param path, layer index or None, HF key, transpose) of every tensor of the encoder."""
    rows = [(("embed", "embedding"), None, SHARED, False), (("relative_attention_bias",), None, REL_BIAS, False)]
    for i in range(m.num_layers):
        rows += [(("blocks",) + path, i, f"encoder.block.{i}.{suffix}", t) for suffix, path, t in _BLOCK]
    return rows + [(("final_norm", "weight"), None, FINAL_NORM, False)]


def expected_shapes(m: ml_collections.ConfigDict) -> dict[str, tuple[int, ...]]:
    """HF key -> shape of every encoder tensor."""
    inner, d = m.num_heads * m.d_kv, m.d_model
    block = {"layer.0.layer_norm.weight": (d,), "layer.0.SelfAttention.q.weight": (inner, d),
             "layer.0.SelfAttention.k.weight": (inner, d), "layer.0.SelfAttention.v.weight": (inner, d),
             "layer.0.SelfAttention.o.weight": (d, inner), "layer.1.layer_norm.weight": (d,),
             "layer.1.DenseReluDense.wi_0.weight": (m.d_ff, d), "layer.1.DenseReluDense.wi_1.weight": (m.d_ff, d),
             "layer.1.DenseReluDense.wo.weight": (d, m.d_ff)}
    shapes = {SHARED: (m.vocab_size, d), REL_BIAS: (m.relative_attention_num_buckets, m.num_heads), FINAL_NORM: (d,)}
    for i in range(m.num_layers):
        shapes.update({f"encoder.block.{i}.{k}": s for k, s in block.items()})
    return shapes




# ----------------------------------------------------------------------------------------------------------------
# Configs
# ----------------------------------------------------------------------------------------------------------------

def model_config_from_hf(data: dict, what: str) -> ml_collections.ConfigDict:
    """text.default_model_config fields from a Hugging Face T5 `config.json` mapping (HF defaults where absent)."""
    if data.get("model_type") != "t5":
        raise ValueError(f"{what}: not a T5 config.json (model_type {data.get('model_type')!r})")
    missing = [f for f in ARCH_FIELDS if f not in data]
    if missing:
        raise ValueError(f"{what}: config.json lacks {missing}")
    cfg = text.default_model_config(**{f: data.get(f, HF_DEFAULTS.get(f)) for f in HF_FIELDS})
    text.validate_config(cfg)
    return cfg


def hf_config_json(m: ml_collections.ConfigDict) -> dict:
    """A Hugging Face `config.json` for `T5EncoderModel` of model config `m`."""
    return dict(architectures=["T5EncoderModel"], model_type="t5", **{f: m[f] for f in HF_FIELDS},
                dense_act_fn="gelu_new", is_gated_act=True, dropout_rate=0.0, initializer_factor=1.0,
                pad_token_id=text.PAD_ID, eos_token_id=text.EOS_ID, decoder_start_token_id=text.PAD_ID,
                is_encoder_decoder=False, use_cache=False, tie_word_embeddings=False)



def _model_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    model = config.model if "model" in config else config
    cfg = text.default_model_config(**dict(model.items()))
    text.validate_config(cfg)
    return cfg


def _read_json(path: pathlib.Path) -> dict:
    if not path.is_file():
        raise FileNotFoundError(f"config file {path} does not exist")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: malformed JSON: {e}") from e
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object")
    return data


def config_from_file(path, *, kind: str = KIND) -> ml_collections.ConfigDict:
    """ConfigDict(kind='t5', model, text_max_len) from a configs/*.py, an HF `config.json`, or a stored checkpoint
    config (JSON with `kind` and `model`)."""
    if kind != KIND:
        raise ValueError(f"convert.t5 handles kind 't5', got {kind!r}")
    path = pathlib.Path(str(path).partition(":")[0])
    if path.suffix == ".json":
        data = _read_json(path)
        if "model" in data:
            loaded = ml_collections.ConfigDict(data)
        else:
            return text.encoder_config(model_config_from_hf(data, str(path)))
    else:
        loaded = configlib.load(path)
    if loaded.get("kind") != KIND:
        raise ValueError(f"{path} is a {loaded.get('kind')!r} config, not {KIND!r}")
    return text.encoder_config(_model_config(loaded), int(loaded.get("text_max_len", text.DEFAULT_TEXT_MAX_LEN)))


# ----------------------------------------------------------------------------------------------------------------
# Import / export
# ----------------------------------------------------------------------------------------------------------------

def _read(path) -> dict[str, np.ndarray]:
    """The encoder tensors of an HF T5 file or folder (decoder / lm_head tensors are never read)."""
    return state_dicts.read_state_dict(path, keep=lambda name: not _NOT_ENCODER.match(name))


def encoder_state_dict(sd: dict[str, np.ndarray], what: str) -> dict[str, np.ndarray]:
    """The encoder's tensors of an encoder-only or encoder-decoder HF state dict (see the module docstring)."""
    out = {k: v for k, v in sd.items() if not _NOT_ENCODER.match(k) and k != TIED_EMBED}
    if TIED_EMBED in sd:
        if SHARED not in sd:
            out[SHARED] = sd[TIED_EMBED]
        elif not np.array_equal(np.asarray(sd[TIED_EMBED]), np.asarray(sd[SHARED])):
            raise state_dicts.StateDictMismatch(f"{what}: {TIED_EMBED!r} differs from {SHARED!r} (they must be tied)")
    return out


def infer_model_config(sd: dict[str, np.ndarray], base: ml_collections.ConfigDict,
                       what: str) -> ml_collections.ConfigDict:
    """`base` (a model config) with its shape fields replaced by those of an encoder state dict."""
    required = (SHARED, REL_BIAS, "encoder.block.0.layer.0.SelfAttention.q.weight",
                "encoder.block.0.layer.1.DenseReluDense.wi_0.weight")
    state_dicts.require_keys(sd, required, what, "a T5 v1.1 encoder")
    buckets, heads = sd[REL_BIAS].shape
    inner = sd["encoder.block.0.layer.0.SelfAttention.q.weight"].shape[0]
    if inner % heads:
        raise state_dicts.StateDictMismatch(f"{what}: q projection width {inner} is not a multiple of {heads} heads")
    layers = len({m.group(1) for k in sd if (m := re.match(r"encoder\.block\.(\d+)\.", k))})
    shapes = dict(vocab_size=int(sd[SHARED].shape[0]), d_model=int(sd[SHARED].shape[1]), d_kv=int(inner // heads),
                  num_heads=int(heads), d_ff=int(sd["encoder.block.0.layer.1.DenseReluDense.wi_0.weight"].shape[0]),
                  num_layers=layers, relative_attention_num_buckets=int(buckets))
    cfg = text.default_model_config(**dict(base.items()))
    cfg.update(shapes)
    return cfg


def _check_fields(a: ml_collections.ConfigDict, b: ml_collections.ConfigDict, fields, what: str, names) -> None:
    bad = [f"{f}: {names[0]} {a[f]!r} vs {names[1]} {b[f]!r}" for f in fields if a[f] != b[f]]
    if bad:
        raise state_dicts.StateDictMismatch(f"{what}: {names[0]} and {names[1]} disagree: " + "; ".join(bad))


def _spiece_proto(folder: pathlib.Path, vocab_size: int) -> bytes:
    path = folder / text.SPIECE_FILE
    if not path.is_file():
        raise FileNotFoundError(f"no {text.SPIECE_FILE} in {folder} (the tokenizer is part of a text encoder)")
    proto = path.read_bytes()
    tok = text.TextTokenizer.from_proto(proto, str(path))
    if tok.vocab_size > vocab_size:
        raise ValueError(f"{path}: {tok.vocab_size} pieces but the embedding has only {vocab_size} rows")
    return proto


def import_weights(src, config: ml_collections.ConfigDict | None = None, *, kind: str = KIND):
    """HF T5 encoder (folder, or safetensors file with config.json + spiece.model beside it) ->
    (ConfigDict(kind, model, text_max_len, spiece_proto), params nested dict of float32 numpy)."""
    if kind != KIND:
        raise ValueError(f"convert.t5 imports kind 't5', got {kind!r}")
    src = pathlib.Path(src).expanduser()
    what = str(src)
    if not src.exists():
        raise FileNotFoundError(f"no T5 weights at {src}")
    folder = src if src.is_dir() else src.parent
    hf_json = folder / "config.json"
    hf_cfg = model_config_from_hf(_read_json(hf_json), str(hf_json)) if hf_json.is_file() else None
    given = _model_config(config) if config is not None else None
    if hf_cfg is None and given is None:
        raise FileNotFoundError(f"{what}: no config.json beside the weights and no config given "
                                f"(max_distance / eps cannot be inferred from weights)")
    sd = encoder_state_dict(_read(src), what)
    base = given if given is not None else hf_cfg
    model_cfg = infer_model_config(sd, base, what)
    if hf_cfg is not None:
        _check_fields(hf_cfg, model_cfg, ARCH_FIELDS, what, ("config.json", "weights"))
        if given is not None:
            _check_fields(given, hf_cfg, HF_FIELDS, what, ("given config", "config.json"))
    if given is not None:
        _check_fields(given, model_cfg, ARCH_FIELDS, what, ("given config", "weights"))
    text.validate_config(model_cfg)
    state_dicts.check_state_dict(sd, expected_shapes(model_cfg), what)
    proto = _spiece_proto(folder, model_cfg.vocab_size)
    params: dict = {}
    stacked: dict = {}
    for path, layer, key, transpose in key_table(model_cfg):
        value = np.asarray(sd[key], np.float32)
        if not np.isfinite(value).all():
            raise ValueError(f"{what}: {key!r} holds NaN or inf")
        value = value.T if transpose else value
        if layer is None:
            set_path(params, path, np.ascontiguousarray(value))
        else:
            stacked.setdefault(path, [None] * model_cfg.num_layers)[layer] = value
    for path, layers in stacked.items():
        set_path(params, path, np.stack(layers))
    text_max_len = int(config.get("text_max_len", text.DEFAULT_TEXT_MAX_LEN)) if config is not None else \
        text.DEFAULT_TEXT_MAX_LEN
    return text.encoder_config(model_cfg, text_max_len, proto), params


def export_weights(config: ml_collections.ConfigDict, params) -> dict[str, np.ndarray]:
    """Params (nested dict) -> the HF encoder state dict (float32, exact key set of `T5EncoderModel`)."""
    model_cfg = _model_config(config)
    fetched, out = {}, {}
    for path, layer, key, transpose in key_table(model_cfg):
        if path not in fetched:
            try:
                fetched[path] = np.asarray(jax.device_get(get_path(params, path)), np.float32)
            except (KeyError, TypeError) as e:
                raise state_dicts.StateDictMismatch(f"parameter {'/'.join(path)} is missing from the checkpoint") from e
        value = fetched[path] if layer is None else fetched[path][layer]
        out[key] = np.ascontiguousarray(value.T if transpose else value)
    state_dicts.check_state_dict(out, expected_shapes(model_cfg), "exported T5 encoder")
    return out


# ----------------------------------------------------------------------------------------------------------------
# Hugging Face folders
# ----------------------------------------------------------------------------------------------------------------

def save_hf_folder(out_dir, config: ml_collections.ConfigDict, params, proto: bytes | None = None) -> pathlib.Path:
    """Writes the HF layout (config.json, model.safetensors, spiece.model); `proto` defaults to the config's."""
    out = pathlib.Path(out_dir).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    state_dicts.write_state_dict(out / "model.safetensors", export_weights(config, params))
    (out / "config.json").write_text(json.dumps(hf_config_json(_model_config(config)), indent=2) + "\n")
    (out / text.SPIECE_FILE).write_bytes(proto if proto is not None else text.spiece_proto(config))
    return out
