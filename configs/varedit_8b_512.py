"""VAREdit-8B at 512 px (pn 0.25M): C 3584, depth 40, 28 heads, d = 56 (d56 tokenizer, 2x2 patchify), flan-T5-XL text,
source conditioning `sar` (official; `configs/varedit_8b_512.py:finest` or `:full` selects the other modes).

  python -m varedit_jax.convert import --kind varedit --src 8B-512.pth --out ckpts/varedit_8b_512 \
      --config configs/varedit_8b_512.py
"""
import ml_collections

from varedit_jax import conditioning, transformer


def get_config(arg=None):
    config = ml_collections.ConfigDict()
    config.kind = "varedit"
    config.conditioning = conditioning.source_mode(arg)
    config.pn = "0.25M"
    config.model = transformer.default_model_config(**transformer.OFFICIAL_SHAPES["8b"])
    return config
