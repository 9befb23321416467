"""VAREdit-8B at 1024 px (pn 1M): C 3584, depth 40, 28 heads, d = 56 (d56 image tokenizer, 2x2 patchify),
flan-T5-XL text, source conditioning `sar` (official; `configs/varedit_8b_1024.py:finest` or `:full` selects the
other modes).

  python -m varedit_jax.convert import --kind varedit --src 8B-1024.pth --out ckpts/varedit_8b_1024 \
      --config configs/varedit_8b_1024.py

The released 1024 px model, a fine-tune of 8B-512 here: 10k steps, batch 256, LR 6e-5 (init_checkpoint: the
previous stage's workdir; paths via `--config.FIELD=...`):

  python -m varedit_jax.train --config configs/varedit_8b_1024.py --workdir runs/varedit_8b_1024 \
      --config.image_tokenizer.path=ckpts/image_tokenizer_d56 --config.text.path=ckpts/flan_t5_xl \
      --config.data.paths=DATA_DIRS
"""
from varedit_jax import train_config, transformer


def get_config(arg=None):
    model = transformer.default_model_config(
        embed_dim=3584, depth=40, num_heads=28, bits=56, patchify=True, text_dim=2048, text_max_len=512,
        block_chunks=8, dtype="bfloat16", remat="full")
    config = train_config.default_config(model, conditioning=arg, pn="1M")
    config.batch_size = 256
    config.total_steps = 10000
    config.optim.lr = 6e-5  # constant: warmup_steps 0 (official)
    config.init_checkpoint = "runs/varedit_8b_512"
    config.checkpoint_every = config.eval_every = config.sample_every = 1000
    config.image_tokenizer.config = str(train_config.REPO / "configs/image_tokenizer_d56.py")
    config.mesh.shape = (1, -1, 1)  # FSDP over every device
    return config
