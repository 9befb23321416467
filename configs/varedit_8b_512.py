"""VAREdit-8B at 512 px (pn 0.25M): C 3584, depth 40, 28 heads, d = 56 (d56 tokenizer, 2x2 patchify), flan-T5-XL text,
source conditioning `sar` (official; `configs/varedit_8b_512.py:finest` or `:full` selects the other modes).

  python -m varedit_jax.convert import --kind varedit --src 8B-512.pth --out ckpts/varedit_8b_512 \
      --config configs/varedit_8b_512.py

The paper's 8B recipe: 60k steps at 512 px (pn 0.25M), batch 1536, LR 6e-5, from Infinity-8B
(set init_checkpoint to the imported Infinity weights; paths via `--config.init_checkpoint=...`):

  python -m varedit_jax.train --config configs/varedit_8b_512.py --workdir runs/varedit_8b_512 \
      --config.vae.path=ckpts/vae_d56 --config.text.path=ckpts/flan_t5_xl --config.data.paths=DATA_DIRS

On a v5p-256 the one-step batch does not fit (the planner: 420 GiB of temporaries per chip); with 12 accumulation
micro-steps it does (35.3 GiB peak per chip):
  python -m varedit_jax.plan --config configs/varedit_8b_512.py --topology v5p-256 --config.grad_accum=12
"""
from varedit_jax import train


def get_config(arg=None):
    return train.paper_config("8b", "0.25M", arg, batch_size=1536, lr=6e-5, total_steps=60000,
                              init_checkpoint="")
