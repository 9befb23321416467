"""The paper's VAREdit-8B recipe (sec. 4.1): one stage, 60k steps at 512 px, batch 1536, LR 6e-5, from Infinity-8B
(`--config.init_checkpoint=ckpts/infinity_8b`); the values are in configs/varedit_8b_512.py. On a v5p-256 add
`--config.grad_accum=12` (see that file).

  python -m varedit_jax.recipe --recipe configs/recipe_varedit_8b.py --workdir gs://bucket/runs/varedit_8b \
      --config.init_checkpoint=gs://bucket/ckpts/infinity_8b --config.image_tokenizer.path=... \
      --config.text.path=... --config.data.paths=... --distributed
"""
import ml_collections


def get_config(arg=None):
    del arg
    return ml_collections.ConfigDict(dict(stages=[
        dict(name="512px", config="configs/varedit_8b_512.py", overrides={}, init="", init_weights=""),
    ]))
