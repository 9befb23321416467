"""VAREdit-2B at 256 px (pn 0.06M): C 2048, depth 32, 16 heads, d = 32 (d32 tokenizer), flan-T5-XL text,
source conditioning `sar` (official; `configs/varedit_2b_256.py:finest` or `:full` selects the other modes).

  python -m varedit_jax.convert import --kind varedit --src 2B-256.pth --out ckpts/varedit_2b_256 \
      --config configs/varedit_2b_256.py
"""
import ml_collections

from varedit_jax import conditioning, transformer


def get_config(arg=None):
    config = ml_collections.ConfigDict()
    config.kind = "varedit"
    config.conditioning = conditioning.source_mode(arg)
    config.pn = "0.06M"
    config.model = transformer.default_model_config(**transformer.OFFICIAL_SHAPES["2b"])
    return config
