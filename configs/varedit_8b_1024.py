"""VAREdit-8B at 1024 px (pn 1M): C 3584, depth 40, 28 heads, d = 56 (d56 tokenizer, 2x2 patchify), flan-T5-XL text,
source conditioning `sar` (official; `configs/varedit_8b_1024.py:finest` or `:full` selects the other modes).

  python -m varedit_jax.convert import --kind varedit --src 8B-1024.pth --out ckpts/varedit_8b_1024 \
      --config configs/varedit_8b_1024.py

VAREdit-8B at 1024 px (pn 1M; the released 1024 px model, a fine-tune of 8B-512 here: batch 256, LR 6e-5)
(init_checkpoint: the previous stage workdir; paths via `--config.init_checkpoint=...`):

  python -m varedit_jax.train --config configs/varedit_8b_1024.py --workdir runs/varedit_8b_1024 \
      --config.vae.path=ckpts/vae_d56 --config.text.path=ckpts/flan_t5_xl --config.data.paths=DATA_DIRS
"""
from varedit_jax import train


def get_config(arg=None):
    return train.paper_config("8b", "1M", arg, batch_size=256, lr=6e-5, total_steps=10000,
                              init_checkpoint="runs/varedit_8b_512")
