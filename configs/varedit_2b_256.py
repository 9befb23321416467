"""VAREdit-2B at 256 px (pn 0.06M): C 2048, depth 32, 16 heads, d = 32 (d32 tokenizer), flan-T5-XL text,
source conditioning `sar` (official; `configs/varedit_2b_256.py:finest` or `:full` selects the other modes).

  python -m varedit_jax.convert import --kind varedit --src 2B-256.pth --out ckpts/varedit_2b_256 \
      --config configs/varedit_2b_256.py

Stage 1 of the paper's 2B recipe: 8k steps at 256 px (pn 0.06M), batch 1536, LR 6e-5, from Infinity-2B
(set init_checkpoint to the imported Infinity weights; paths via `--config.init_checkpoint=...`):

  python -m varedit_jax.train --config configs/varedit_2b_256.py --workdir runs/varedit_2b_256 \
      --config.vae.path=ckpts/vae_d32 --config.text.path=ckpts/flan_t5_xl --config.data.paths=DATA_DIRS
"""
from varedit_jax import train


def get_config(arg=None):
    return train.paper_config("2b", "0.06M", arg, batch_size=1536, lr=6e-5, total_steps=8000,
                              init_checkpoint="")
