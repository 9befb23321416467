"""The d56 BSQ tokenizer of Infinity-8B / VAREdit-8B (`infinity_vae_d56_f8_14_patchify.pth`): stride 8, d = 14,
with the 2x2 spatial patchify on the transformer side (tokens of 56 channels, 16 pixels per token).
"""
import ml_collections


def get_config(arg=None):
    del arg
    config = ml_collections.ConfigDict()
    config.kind = "image_tokenizer"
    config.model = ml_collections.ConfigDict(dict(
        base_ch=128,
        ch_mult=(1, 2, 4, 4),
        num_res_blocks=2,
        patch_size=8,
        codebook_dim=14,
        patchify=True,
        precision="highest",
        norm_groups=0,  # the official rule: 32 groups (24 if C % 32 != 0)
    ))
    return config
