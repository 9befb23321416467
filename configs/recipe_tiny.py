"""A tiny two-stage recipe on the toy data, the shape of the paper's 2B recipe on a CPU: the tiny default at 64 px
(keeping an EMA), then 128 px (pn 0.25M with the stride-4 toy tokenizer: 10 scales up to 32x32) from stage 1's
EMA, at a lower LR.

  python -m varedit_jax.recipe --recipe configs/recipe_tiny.py --workdir runs/recipe_tiny
"""
import ml_collections


def get_config(arg=None):
    del arg
    return ml_collections.ConfigDict(dict(stages=[
        dict(name="64px", config="configs/varedit_tiny.py", overrides={"optim.ema_decay": 0.99}, init="",
             init_weights=""),
        dict(name="128px", config="configs/varedit_tiny.py",
             overrides={"pn": "0.25M", "data.pn": "0.25M", "eval_data.pn": "0.25M", "total_steps": 50,
                        "checkpoint_every": 25, "optim.lr": 3e-4, "optim.warmup_steps": 0},
             init="previous", init_weights=""),
    ]))
