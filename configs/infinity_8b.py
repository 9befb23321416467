"""Infinity-8B (`tools/run_infinity.py`): C 3584, depth 40, 28 heads, FFN 14336, d = 56 (d56 tokenizer: 14 channels,
2x2 patchify), flan-T5-XL text (2048), text_max_len 512; 1024 px (pn 1M).

  python -m varedit_jax.convert import --kind infinity --src infinity_8b_weights/ --out ckpts/infinity_8b \
      --config configs/infinity_8b.py
"""
import ml_collections

from varedit_jax import transformer


def get_config(arg=None):
    del arg
    config = ml_collections.ConfigDict()
    config.kind = "infinity"
    config.conditioning = "none"
    config.pn = "1M"
    config.model = transformer.default_model_config(**transformer.OFFICIAL_SHAPES["8b"])
    return config
