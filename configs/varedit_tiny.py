"""The tiny CPU default: a VAREdit-shaped transformer on the toy task (64 px images, toy image tokenizer d = 16
stride 4, toy text encoder width 128), pn 0.06M on the 1.0 template: 521 target tokens, 777 with the finest-scale
source (`sar`, default, and `finest`), 1042 with `full` (`configs/varedit_tiny.py:full` / `:finest`).

  python -m varedit_jax.train --config configs/varedit_tiny.py --workdir runs/tiny

Empty asset paths (image_tokenizer.path, text.path, data.paths) are filled with the toy assets, built once into the
cache (`varedit_jax.assets`).
"""
from varedit_jax import train_config, transformer


def get_config(arg=None):
    model = transformer.default_model_config(
        embed_dim=128, depth=4, num_heads=4, bits=16, text_dim=128, text_max_len=32,
        block_chunks=2, remat="none", drop_path_rate=0.0)
    config = train_config.default_config(model, conditioning=arg, pn="0.06M")
    config.total_steps = 200        # with the toy assets: <= 15 min on 2 cores (launch/train.sh)
    config.batch_size = 8
    config.checkpoint_every = 100
    config.log_every = 10
    config.eval_batches = 2
    config.toy_eval_pairs = 64      # the end of the run prints success / preservation / balance on 64 held-out pairs
    config.optim.lr = 1e-3
    config.optim.warmup_steps = 20
    config.text.max_len = 32
    # What an empty image_tokenizer.path / text.path build (and what the planner reads).
    config.image_tokenizer.config = str(train_config.REPO / "configs/toy_image_tokenizer.py")
    config.text.config = str(train_config.REPO / "configs/toy_text.py")
    config.text.dtype = "float32"   # bf16 is slow on CPUs
    config.data.max_text_len = config.eval_data.max_text_len = 32
    config.data.read_threads = config.eval_data.read_threads = 2
    config.bsc.noise_apply_layers = 7  # every scale at 0.06M
    return config
