"""VAREdit-8B at 512 px (pn 0.25M): C 3584, depth 40, 28 heads, d = 56 (d56 image tokenizer, 2x2 patchify),
flan-T5-XL text, source conditioning `sar` (official; `configs/varedit_8b_512.py:finest` or `:full` selects the
other modes).

  python -m varedit_jax.convert import --kind varedit --src 8B-512.pth --out ckpts/varedit_8b_512 \
      --config configs/varedit_8b_512.py

The paper's 8B recipe (sec. 4.1): 60k steps at 512 px, batch 1536, LR 6e-5, from Infinity-8B (set init_checkpoint
to the imported Infinity weights; paths via `--config.FIELD=...`):

  python -m varedit_jax.train --config configs/varedit_8b_512.py --workdir runs/varedit_8b_512 \
      --config.image_tokenizer.path=ckpts/image_tokenizer_d56 --config.text.path=ckpts/flan_t5_xl \
      --config.data.paths=DATA_DIRS

On a v5p-256 the one-step batch does not fit (the planner: 420 GiB of temporaries per chip); with 12 accumulation
micro-steps it does (35.3 GiB peak per chip):

  python -m varedit_jax.plan --config configs/varedit_8b_512.py --topology v5p-256 --config.grad_accum=12
"""
from varedit_jax import train_config, transformer


def get_config(arg=None):
    model = transformer.default_model_config(
        embed_dim=3584, depth=40, num_heads=28, bits=56, patchify=True, text_dim=2048, text_max_len=512,
        block_chunks=8, dtype="bfloat16", remat="full")
    config = train_config.default_config(model, conditioning=arg, pn="0.25M")
    config.batch_size = 1536
    config.total_steps = 60000
    config.optim.lr = 6e-5  # constant: warmup_steps 0 (official)
    config.init_checkpoint = ""
    config.checkpoint_every = config.eval_every = config.sample_every = 1000
    config.image_tokenizer.config = str(train_config.REPO / "configs/image_tokenizer_d56.py")
    config.mesh.shape = (1, -1, 1)  # FSDP over every device
    return config
