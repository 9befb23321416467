"""Toy image tokenizer (BSQ) for the tiny CPU default: the official autoencoder class at a few percent of the width.

64 x 64 px images (the 1.0 template at 0.06M: 7 scales up to 16 x 16 = 521 tokens, stride 4), d = 16 bits per token.
Trained on the procedural toy editing images (`data_pipelines.toy.render_pair`, sources and targets):

  python -m varedit_jax.assets.toy_image_tokenizer --config configs/toy_image_tokenizer.py --workdir runs/toy_tok
  python -m varedit_jax.reconstruct --image_tokenizer runs/toy_tok --image IN.png --out RECON.png
"""
import ml_collections


def get_config(arg=None):
    del arg
    config = ml_collections.ConfigDict()
    config.kind = "image_tokenizer"
    config.model = ml_collections.ConfigDict(dict(
        base_ch=16,
        ch_mult=(1, 2, 2),
        num_res_blocks=1,
        patch_size=4,
        codebook_dim=16,
        patchify=False,
        precision="highest",
        norm_groups=4,  # 4-8 channels per group at these widths (the official rule would refuse 16 channels)
    ))
    # Image size = last grid of the (template, pn) schedule x the tokenizer stride.
    config.data = ml_collections.ConfigDict(dict(seed=0, template="1.0", pn="0.06M", eval_seed=1, eval_images=16))

    config.seed = 0
    config.batch_size = 8
    config.num_steps = 1000  # about 6 minutes on 2 idle cores; colours appear after ~600 steps
    config.lr = 2e-3
    config.warmup_steps = 30
    config.end_lr_ratio = 0.1
    config.b1 = 0.9
    config.b2 = 0.95
    config.weight_decay = 1e-4
    config.grad_clip = 1.0

    # loss = l1_weight * |x - x'| + mse_weight * (x - x')^2 + commitment_weight * (features - sg(quantized))^2
    config.l1_weight = 1.0
    config.mse_weight = 1.0
    config.commitment_weight = 0.25
    config.object_weight = 0.0  # pixel weight 1 + object_weight * chroma (see toy_image_tokenizer.pixel_weights)

    config.log_every = 50
    config.checkpoint_every = 250
    return config
