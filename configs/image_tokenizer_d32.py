"""The d32 BSQ tokenizer of Infinity-2B / VAREdit-2B (`infinity_vae_d32reg.pth`): stride 16, d = 32, no patchify.

  python -m varedit_jax.convert import --kind image_tokenizer --src infinity_vae_d32reg.pth --out ckpts/image_tokenizer_d32 \
      --config configs/image_tokenizer_d32.py
"""
import ml_collections


def get_config(arg=None):
    del arg
    config = ml_collections.ConfigDict()
    config.kind = "image_tokenizer"
    config.model = ml_collections.ConfigDict(dict(
        base_ch=128,
        ch_mult=(1, 2, 4, 4, 4),
        num_res_blocks=2,
        patch_size=16,
        codebook_dim=32,
        patchify=False,
        precision="highest",  # fp32 convolutions, as the official encoder_dtype='fp32'
        norm_groups=0,  # the official rule: 32 groups (24 if C % 32 != 0)
    ))
    return config
