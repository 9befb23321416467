"""google/flan-t5-xl, the text encoder of Infinity / VAREdit (encoder only: 24 blocks, width 2048, 1.22B params).

  python -m varedit_jax.convert import --kind t5 --src flan-t5-xl/ --out ckpts/flan_t5_xl --config configs/flan_t5_xl.py

`flan-t5-xl/` is the Hugging Face folder (config.json, model-0000x-of-00002.safetensors + index, spiece.model); the
decoder half of that checkpoint is ignored. Training runs it frozen in bfloat16 (`load_text_encoder(path,
dtype="bfloat16")`); the official code runs it in float16. The folder also loads directly, without importing.
"""
import ml_collections

from varedit_jax import text


def get_config(arg=None):
    del arg
    config = ml_collections.ConfigDict()
    config.kind = "t5"
    config.model = text.default_model_config(
        vocab_size=32128, d_model=2048, d_kv=64, num_heads=32, d_ff=5120, num_layers=24,
        relative_attention_num_buckets=32, relative_attention_max_distance=128, layer_norm_epsilon=1e-6,
        feed_forward_proj="gated-gelu", dtype="float32", precision="highest")
    config.text_max_len = 512  # static token length (official tokenizer max_length)
    return config
