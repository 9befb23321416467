"""Conversion between official PyTorch checkpoints and varedit_jax orbax checkpoints.

One module per model family, each an explicit key table used by both directions:
  image_tokenizer.py  BSQ image tokenizers (d32 / d56)
  infinity.py  Infinity / VAREdit transformers (same key set)
  t5.py        flan-T5 (T5 v1.1) encoders in the Hugging Face layout
Each family module provides
  import_weights(src, config=None, *, kind) -> (ConfigDict with `kind` and `model`, params: nested dict of numpy)
      architecture inferred from the weights; a given config supplies the rest and is checked against them
  export_weights(config, params) -> flat official state dict (name -> numpy array), the exact official key set
  config_from_file(path, *, kind) -> ConfigDict with `kind` and `model` (a configs/*.py or a fixture config.json)
`varedit_jax/state_dicts.py` reads/writes the files; `bundle.py` is the export's model.json (the official
constructor's arguments) and what the official code cannot serve; `__main__.py` is the CLI.
"""
import importlib

KINDS = {"image_tokenizer": "image_tokenizer", "infinity": "infinity", "varedit": "infinity", "t5": "t5"}


def family(kind: str):
    """The conversion module of a checkpoint kind."""
    if kind not in KINDS:
        raise ValueError(f"unknown kind {kind!r}; expected one of {sorted(KINDS)}")
    return importlib.import_module(f"varedit_jax.convert.{KINDS[kind]}")
