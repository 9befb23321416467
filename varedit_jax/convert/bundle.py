"""The export bundle: what the unmodified official PyTorch code needs beside the exported weights, as `model.json`.

model.json (FORMAT), written next to the weights by `python -m varedit_jax.convert export`:
  constructor_kwargs  the keyword arguments of the official `infinity.models.infinity.Infinity` that rebuild the
                      model, less those the caller supplies per run (CALLER_SUPPLIED). `text_maxlen` is the row count
                      of the exported `cfg_uncond` (so `load_state_dict(strict=True)` matches every shape).
  model_type          "infinity_2b" / "infinity_8b" when the shapes equal a released model (the official registry
                      functions of those names build them), else null
  kind, conditioning  "varedit" + "sar" (editing), or "infinity" + "none" (text-to-image)
  pn                  the size class trained (or null when unknown: an imported checkpoint without a config)
  text_max_len        the trained text length: tokenize instructions to at most this many tokens
  weights             {"file", "which": "ema" | "params", "dtype": "fp32" | "bf16", "step"}
  image_tokenizer     {"vae_type" (official `--vae_type`: d, 14 for the patchified d56), "apply_spatial_patchify",
                      "path" (where the run's tokenizer was), and with `--with-tokenizer` "file" (its weights, beside
                      the transformer's) and "config" (its architecture)}
  text_encoder        {"path", "config" (where the run's encoder and its configs/*.py were), "width", "max_len"}
`infinity.config_from_file` reads a model.json back (`convert import --config model.json`).

Refusals (`serving_problems`): the official inference runs only SAR editing (and text-to-image), and its constructor
derives some widths from others (attentive-pooling heads = text width // 128, or // 64 above C 4096; FFN width =
round(C * mlp_ratio / 256) * 256; 15 level embeddings). A model outside that is refused by `convert export` (`--force`
exports it anyway) and warned about when training starts.
"""
import json
import pathlib

import ml_collections

from varedit_jax import state_dicts, storage, transformer
from varedit_jax.convert import infinity

FORMAT = "varedit_jax.export/1"
FILE = "model.json"
CALLER_SUPPLIED = ("vae_local", "batch_size", "use_flex_attn", "inference_mode", "raw_scale_schedule")
SERVABLE_CONDITIONING = ("sar", "none")
NUM_LEVELS = 15  # the official lvl_embed rows
RELEASED = {"infinity_2b": "2b", "infinity_8b": "8b"}  # model_type -> transformer.OFFICIAL_SHAPES


class NotServable(ValueError):
    """The official code cannot build or run this model (`serving_problems`)."""


def _pool_divisor(embed_dim: int) -> int:
    return 128 if embed_dim <= 4096 else 64


def serving_problems(config: ml_collections.ConfigDict) -> list[str]:
    """What the unmodified official code cannot build or run in a transformer config (empty: servable)."""
    m = infinity.model_config(config)
    problems = []
    if config.get("conditioning", "sar") not in SERVABLE_CONDITIONING:
        problems.append(f"conditioning {config.conditioning!r}: the official inference runs SAR editing only")
    heads = transformer.official_text_pool_heads(m.text_dim, m.embed_dim)
    if heads < 1:
        problems.append(f"text width {m.text_dim}: the official constructor gives it {m.text_dim} // "
                        f"{_pool_divisor(m.embed_dim)} = 0 attentive-pooling heads (a text encoder width >= "
                        f"{_pool_divisor(m.embed_dim)} is needed)")
    elif heads != m.text_pool_heads or m.embed_dim % heads:
        problems.append(f"text_pool_heads {m.text_pool_heads}: the official constructor derives {heads} from text "
                        f"width {m.text_dim}, and they must divide embed_dim {m.embed_dim}")
    if m.mlp_dim % 256:
        problems.append(f"mlp_dim {m.mlp_dim}: the official FFN width is a multiple of 256")
    if m.num_levels != NUM_LEVELS:
        problems.append(f"num_levels {m.num_levels}: the official model has {NUM_LEVELS} level embeddings")
    return problems


def model_type(m: ml_collections.ConfigDict) -> str | None:
    """The official registry name whose shapes a model config has, or None."""
    for name, key in RELEASED.items():
        shape = {k: v for k, v in transformer.OFFICIAL_SHAPES[key].items() if k != "text_max_len"}
        if all(m[k] == v for k, v in shape.items()) and m.mlp_dim == transformer.official_mlp_dim(m.embed_dim):
            return name
    return None


def _number(x: float):
    return int(x) if float(x).is_integer() else float(x)


def constructor_kwargs(config: ml_collections.ConfigDict) -> dict:
    """The official constructor's keyword arguments for a transformer config (CALLER_SUPPLIED left out)."""
    m = infinity.model_config(config)
    ours = {theirs: m[field] for field, theirs in infinity.CONSTRUCTOR_FIELDS}
    templates = (config.get("data") or {}).get("templates") or ("1.0",)
    text_cfg = config.get("text") or {}
    return {
        "text_channels": ours["text_channels"], "text_maxlen": max(m.cfg_uncond_export_rows, m.text_max_len),
        "embed_dim": ours["embed_dim"], "depth": ours["depth"], "num_heads": ours["num_heads"],
        "block_chunks": ours["block_chunks"], "pn": config.get("pn") or None,
        "train_h_div_w_list": [float(t) for t in templates], **infinity.SUPPORTED_FLAGS,
        "norm_eps": ours["norm_eps"], "cross_attn_layer_scale": -1.0, "mlp_ratio": _number(m.mlp_dim / m.embed_dim),
        "drop_rate": 0.0, "drop_path_rate": ours["drop_path_rate"], "customized_flash_attn": False,
        "fused_mlp": False,
        "fused_norm": True,  # the non-fused official path drops the scale index (wrong RoPE start, SAR pooling)
        "pad_to_multiplier": 128, "apply_spatial_patchify": int(m.patchify), "checkpointing": "full-block",
        "cond_drop_rate": float(text_cfg.get("drop_rate", 0.1)), "top_p": 0.0, "top_k": 0.0,
    }


def describe(config: ml_collections.ConfigDict, *, step: int, weights_file: str, which: str, dtype: str,
             tokenizer: dict | None = None) -> dict:
    """The model.json contents (see the module docstring). tokenizer: {"file", "config"} when its weights were
    exported too."""
    m = infinity.model_config(config)
    text_cfg = config.get("text") or {}
    tok_cfg = config.get("image_tokenizer") or {}
    return {
        "format": FORMAT,
        "constructor_kwargs": constructor_kwargs(config),
        "model_type": model_type(m),
        "kind": config.kind, "conditioning": config.conditioning, "pn": config.get("pn") or None,
        "text_max_len": int(m.text_max_len),
        "weights": {"file": weights_file, "which": which, "dtype": dtype, "step": int(step)},
        "image_tokenizer": {"vae_type": m.bits // 4 if m.patchify else m.bits,
                            "apply_spatial_patchify": int(m.patchify), "path": tok_cfg.get("path") or None,
                            **(tokenizer or {})},
        "text_encoder": {"path": text_cfg.get("path") or None, "config": text_cfg.get("config") or None,
                         "width": int(m.text_dim), "max_len": int(text_cfg.get("max_len") or m.text_max_len)},
    }


def write(directory, contents: dict):
    """Writes DIR/model.json (local: atomically, mode 0644; or gs://)."""
    path = storage.path(directory) / FILE
    text = json.dumps(contents, indent=1) + "\n"
    return state_dicts.atomic_write(path, lambda tmp: pathlib.Path(tmp).write_text(text))

