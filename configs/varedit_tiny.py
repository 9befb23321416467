"""The tiny CPU default: a VAREdit-shaped transformer for the toy tokenizer (d = 32, stride 4: 64 px images ->
16 x 16 latents) and the toy text encoder (width 64). pn 0.06M on the 1.0 template: 521 target tokens, 777 with the
finest-scale source (`sar`, default), 1042 with `full` (`configs/varedit_tiny.py:full` / `:finest`).
"""
import ml_collections

from varedit_jax import conditioning, transformer


def get_config(arg=None):
    config = ml_collections.ConfigDict()
    config.kind = "varedit"
    config.conditioning = conditioning.source_mode(arg)
    config.pn = "0.06M"
    config.model = transformer.default_model_config(
        embed_dim=128, depth=4, num_heads=4, bits=32, text_dim=64, text_max_len=64, text_pool_heads=1,
        block_chunks=2, remat="none", drop_path_rate=0.0)
    return config
