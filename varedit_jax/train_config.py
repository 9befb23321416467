"""The training config: every field with its default (`default_config`), and its validation (`validate`).

What `configs/varedit_*.py` import (with the model config helpers): each returns
`default_config(transformer.default_model_config(...), conditioning=..., pn=...)` with the fields that differ set
one by one, so every value of a paper recipe is visible in its file. Groups:
  model            the transformer (`transformer.default_model_config`)
  image_tokenizer  path (official weights / checkpoint; empty: the toy tokenizer) and config (its configs/*.py, for
                   abstract AOT planning)
  text             the frozen text encoder: path, config, max_len (static token length), dtype (compute), cache
                   (host-cached features instead of the encoder in the step), drop_rate (CFG text dropout)
  bsc, loss        bitwise self-correction and the per-bit loss weighting
  optim            `optim.default_config`;  data / eval_data: `data.default_config`;  mesh: `slices` (TPU slices the
                   run spans: the "dcn" axis), `shape` over (data, fsdp, tensor) within each slice (-1 = the rest)
                   and the logical-axis `rules`;  toy: the toy assets
Stored checkpoint configs of older versions are migrated on load (`checkpoint.migrate`).
"""
import pathlib

import ml_collections

from varedit_jax import conditioning as conditioning_lib
from varedit_jax import data, optim, sharding, watchdog

REPO = pathlib.Path(__file__).resolve().parent.parent


def toy_config() -> ml_collections.ConfigDict:
    """`config.toy`: what the toy assets (`varedit_jax.assets`) are built from."""
    return ml_collections.ConfigDict(dict(
        num_pairs=4000, seed=0,            # training split
        eval_pairs=64, eval_seed=1,        # held-out split (validation loss, ablation scores)
        image_tokenizer_steps=600))        # toy tokenizer training steps (configs/toy_image_tokenizer.py otherwise)


def default_config(model: ml_collections.ConfigDict, *, conditioning: str | None,
                   pn: str) -> ml_collections.ConfigDict:
    """Every field of a training config (the model's fields under `model`). `conditioning`: full / finest / sar
    (None: sar)."""
    c = ml_collections.ConfigDict()
    c.kind = "varedit"
    c.conditioning = conditioning_lib.parse(conditioning)
    c.pn = pn
    c.model = model
    c.seed = 0
    c.total_steps = 1000
    c.batch_size = 8                     # global batch (per optimizer step)
    c.grad_accum = 1                     # micro-batches per step (batch_size must divide by it)
    c.checkpoint_every = 500
    c.keep_checkpoints = 3
    c.keep_period = 0                    # also keep every keep_period-th step (milestones; 0: none)
    c.init_checkpoint = ""               # Infinity / VAREdit weights or checkpoint to start from (stage 1 / stage 2)
    c.init_weights = "params"            # of a training checkpoint: "params", or "ema" (its EMA, when it kept one)
    c.max_nonfinite_steps = 20
    c.watchdog = watchdog.default_config()  # a step > factor x the median (after warm-up) is a hang: exit 75
    c.log_every = 10
    c.eval_every = 0                     # validation loss every N steps (0: only at the end; -1: never)
    c.eval_batches = 2
    c.sample_every = 0                   # sample edit grid every N steps (0: only at the end; -1: never)
    c.sample_count = 8
    c.toy_eval_pairs = 0                 # at the end: edit the first N eval_data pairs and score them with the toy
                                         # metrics beside copy-source / oracle (the toy task: targets + masks; 0: off)
    c.profile = ml_collections.ConfigDict(dict(start_step=-1, num_steps=3))  # jax.profiler window (-1: off)
    c.compilation_cache = True
    c.compilation_cache_dir = ""         # JAX's persistent compilation cache, local or gs:// ("": $VAREDIT_CACHE/xla)
    c.image_tokenizer = ml_collections.ConfigDict(dict(path="",
                                                       config=str(REPO / "configs/image_tokenizer_d32.py")))
    c.text = ml_collections.ConfigDict(dict(path="", config=str(REPO / "configs/flan_t5_xl.py"), max_len=512,
                                            dtype="bfloat16", cache=False, drop_rate=0.1))
    c.bsc = ml_collections.ConfigDict(dict(noise_apply_layers=13, noise_apply_strength=0.3, requant=True))
    c.loss = ml_collections.ConfigDict(dict(reweight_by_scale=True, label_smoothing=0.0))
    c.optim = optim.default_config()
    c.data = data.default_config()
    c.data.pn = pn
    c.eval_data = data.default_config()
    c.eval_data.pn = pn
    c.eval_data.shuffle = False
    c.toy = toy_config()
    c.mesh = ml_collections.ConfigDict(dict(slices=1, shape=(-1, 1, 1),
                                            rules=tuple(tuple(r) for r in sharding.DEFAULT_RULES)))
    return c


def paths(config: ml_collections.ConfigDict) -> list[str]:
    """Every storage location a config names (weights, checkpoints, datasets, caches), local or gs://."""
    named = [config.image_tokenizer.path, config.text.path, config.init_checkpoint, config.compilation_cache_dir,
             *config.data.paths, *config.eval_data.paths]
    return [str(p) for p in named if p]


def validate(config: ml_collections.ConfigDict) -> None:
    """Raises ValueError for inconsistent settings (before anything is built)."""
    if config.conditioning not in conditioning_lib.MODES:
        raise ValueError(f"conditioning must be one of {conditioning_lib.MODES}, got {config.conditioning!r}")
    if (config.kind == "varedit") == (config.conditioning == "none"):
        raise ValueError(f"kind {config.kind!r} does not go with conditioning {config.conditioning!r}")
    if config.total_steps < 0 or config.checkpoint_every <= 0 or config.keep_checkpoints <= 0 or config.keep_period < 0:
        raise ValueError("total_steps >= 0, checkpoint_every > 0, keep_checkpoints > 0 and keep_period >= 0 are "
                         "required")
    if config.batch_size <= 0 or config.batch_size % config.grad_accum:
        raise ValueError(f"batch_size {config.batch_size} must be a positive multiple of grad_accum "
                         f"{config.grad_accum}")
    if config.mesh.slices < 1:
        raise ValueError(f"mesh.slices must be >= 1, got {config.mesh.slices}")
    if config.data.pn != config.pn:
        raise ValueError(f"data.pn {config.data.pn} != pn {config.pn}")
    if config.toy_eval_pairs < 0:
        raise ValueError(f"toy_eval_pairs must be >= 0, got {config.toy_eval_pairs}")
    if config.init_weights not in ("params", "ema"):
        raise ValueError(f"init_weights must be 'params' or 'ema', got {config.init_weights!r}")
    optim.validate(config.optim)
