"""VAREdit-2B at 512 px (pn 0.25M): C 2048, depth 32, 16 heads, d = 32 (d32 image tokenizer),
flan-T5-XL text, source conditioning `sar` (official; `configs/varedit_2b_512.py:finest` or `:full` selects the
other modes).

  python -m varedit_jax.convert import --kind varedit --src 2B-512.pth --out ckpts/varedit_2b_512 \
      --config configs/varedit_2b_512.py

Stage 2 of the paper's 2B recipe (sec. 4.1): 7k steps at 512 px, batch 960, LR 1.875e-5, from stage 1
(init_checkpoint: the previous stage's workdir; paths via `--config.FIELD=...`):

  python -m varedit_jax.train --config configs/varedit_2b_512.py --workdir runs/varedit_2b_512 \
      --config.image_tokenizer.path=ckpts/image_tokenizer_d32 --config.text.path=ckpts/flan_t5_xl \
      --config.data.paths=DATA_DIRS
"""
from varedit_jax import train_config, transformer


def get_config(arg=None):
    model = transformer.default_model_config(
        embed_dim=2048, depth=32, num_heads=16, bits=32, patchify=False, text_dim=2048, text_max_len=512,
        block_chunks=8, dtype="bfloat16", remat="full")
    config = train_config.default_config(model, conditioning=arg, pn="0.25M")
    config.batch_size = 960
    config.total_steps = 7000
    config.optim.lr = 1.875e-5  # constant: warmup_steps 0 (official)
    config.init_checkpoint = "runs/varedit_2b_256"
    config.checkpoint_every = config.eval_every = config.sample_every = 1000
    config.image_tokenizer.config = str(train_config.REPO / "configs/image_tokenizer_d32.py")
    config.mesh.shape = (1, -1, 1)  # FSDP over every device
    return config
