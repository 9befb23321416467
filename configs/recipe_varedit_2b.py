"""The paper's VAREdit-2B recipe (sec. 4.1), two stages in one command (`python -m varedit_jax.recipe`):
  1. 256 px: 8k steps, batch 1536, LR 6e-5, from Infinity-2B (`--config.init_checkpoint=ckpts/infinity_2b`)
  2. 512 px: 7k steps, batch 960, LR 1.875e-5, from stage 1's final weights (its EMA when it kept one)
The values of each stage are in its training config (configs/varedit_2b_256.py, configs/varedit_2b_512.py).

  python -m varedit_jax.recipe --recipe configs/recipe_varedit_2b.py --workdir gs://bucket/runs/varedit_2b \
      --config.init_checkpoint=gs://bucket/ckpts/infinity_2b --config.image_tokenizer.path=... \
      --config.text.path=... --config.data.paths=... --distributed
(command-line overrides apply to both stages; stage 2's init_checkpoint is always stage 1.)
"""
import ml_collections


def get_config(arg=None):
    del arg
    return ml_collections.ConfigDict(dict(stages=[
        dict(name="256px", config="configs/varedit_2b_256.py", overrides={}, init="", init_weights=""),
        dict(name="512px", config="configs/varedit_2b_512.py", overrides={}, init="previous", init_weights=""),
    ]))
