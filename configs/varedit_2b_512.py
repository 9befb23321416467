"""VAREdit-2B at 512 px (pn 0.25M): C 2048, depth 32, 16 heads, d = 32 (d32 tokenizer), flan-T5-XL text,
source conditioning `sar` (official; `configs/varedit_2b_512.py:finest` or `:full` selects the other modes).

  python -m varedit_jax.convert import --kind varedit --src 2B-512.pth --out ckpts/varedit_2b_512 \
      --config configs/varedit_2b_512.py

Stage 2 of the paper's 2B recipe: 7k steps at 512 px (pn 0.25M), batch 960, LR 1.875e-5, from stage 1
(init_checkpoint: the previous stage workdir; paths via `--config.init_checkpoint=...`):

  python -m varedit_jax.train --config configs/varedit_2b_512.py --workdir runs/varedit_2b_512 \
      --config.vae.path=ckpts/vae_d32 --config.text.path=ckpts/flan_t5_xl --config.data.paths=DATA_DIRS
"""
from varedit_jax import train


def get_config(arg=None):
    return train.paper_config("2b", "0.25M", arg, batch_size=960, lr=1.875e-5, total_steps=7000,
                              init_checkpoint="runs/varedit_2b_256")
