"""The toy text encoder of the tiny default: a random-init T5 v1.1 encoder (width 128, 2 blocks) with a sentencepiece
model trained on the toy instructions (`varedit_jax.assets.toy_text_encoder` builds it from these fields;
`vocab_size` is the upper bound given to sentencepiece: the toy corpus supports fewer pieces).
"""
import ml_collections

from varedit_jax import text


def get_config(arg=None):
    del arg
    config = ml_collections.ConfigDict()
    config.kind = "t5"
    config.model = text.default_model_config(vocab_size=512, d_model=128, d_kv=32, num_heads=4, d_ff=256, num_layers=2)
    return config
