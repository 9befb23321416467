"""Infinity-2B (official `infinity_2b`, `--model=2bc8`): C 2048, depth 32, 16 heads, FFN 8192, d = 32 (d32 tokenizer),
flan-T5-XL text (2048), text_max_len 512; 1024 px (pn 1M).

  python -m varedit_jax.convert import --kind infinity --src infinity_2b_reg.pth --out ckpts/infinity_2b \
      --config configs/infinity_2b.py
"""
import ml_collections

from varedit_jax import transformer


def get_config(arg=None):
    del arg
    config = ml_collections.ConfigDict()
    config.kind = "infinity"
    config.conditioning = "none"
    config.pn = "1M"
    config.model = transformer.default_model_config(**transformer.OFFICIAL_SHAPES["2b"])
    return config
