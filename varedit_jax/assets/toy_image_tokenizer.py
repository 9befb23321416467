"""Trains the toy image tokenizer (the official autoencoder class with a tiny config) on the procedural toy images.

  python -m varedit_jax.assets.toy_image_tokenizer --config configs/toy_image_tokenizer.py --workdir DIR \
      [--config.num_steps=100]

Loss: l1 + mse reconstruction of the decoder output from the multi-scale BSQ latent (straight-through codes) plus a
commitment term pulling the raw features towards the (stopped) quantized latent. AdamW, warmup + cosine LR.
Single device (the toy default runs on a CPU).

Workdir:
  checkpoints/<step>/   params + config (`checkpoint.save_params`, kind 'image_tokenizer'): the workdir works as
                        the image tokenizer anywhere (`image_tokenizer.path`, `--image-tokenizer`)
  train_state/<step>/   optimizer state for resuming (re-running the same command resumes from the newest step)
  metrics.jsonl         one JSON line per log step
Images: step s uses images s*B .. s*B + B - 1 of the stream (pair i // 2, source if i is even else target) of
`data_pipelines.toy.render_pair(seed, pair, size)`, so a resumed run sees exactly the images it would have seen.
"""
import json
import pathlib
import sys
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
from absl import app, flags, logging
from flax import nnx
from ml_collections import config_flags

from data_pipelines import toy
from varedit_jax import checkpoint, configlib, image_tokenizer, images, schedules

TRAIN_STATE = "train_state"


def toy_images(seed: int, first: int, count: int, size: int) -> np.ndarray:
    """Images first .. first + count - 1 of the toy stream as float32 (count, size, size, 3) in [-1, 1]."""
    out = []
    for i in range(first, first + count):
        pair = toy.render_pair(seed, i // 2, size)
        img = np.asarray(pair["source" if i % 2 == 0 else "target"])
        if img.shape != (size, size, 3) or img.dtype != np.uint8:
            raise ValueError(f"toy.render_pair returned an image of shape {img.shape} / {img.dtype}, "
                             f"expected ({size}, {size}, 3) uint8")
        out.append(img)
    return images.to_model_range(np.stack(out))


def train_schedule(config: ml_collections.ConfigDict) -> tuple[schedules.Schedule, int]:
    """(transformer schedule, square image side) of the training config."""
    sched = schedules.scale_schedule(config.data.template, config.data.pn)
    stride = config.model.patch_size * (2 if config.model.patchify else 1)
    h, w = schedules.pixel_size(sched, stride)
    if h != w:
        raise ValueError(f"the toy trainer uses square images; template {config.data.template} gives {h}x{w}")
    return sched, h


def pixel_weights(pixels: jax.Array, object_weight: float) -> jax.Array:
    """(B, H, W, 1) loss weights 1 + object_weight * chroma (max - min over RGB, in [0, 1]): the coloured objects of
    the toy images (a few percent of the pixels) count as much as the grey backgrounds; mean 1 per image."""
    chroma = (pixels.max(-1, keepdims=True) - pixels.min(-1, keepdims=True)) / 2.0
    w = 1.0 + object_weight * chroma
    return w / w.mean(axis=(1, 2, 3), keepdims=True)


def loss_fn(model: image_tokenizer.ImageTokenizer, pixels: jax.Array, sched, config) -> tuple[jax.Array, dict]:
    recon, codes, features = model(pixels, sched)
    err = recon - pixels
    w = pixel_weights(pixels, config.object_weight)
    l1, mse = jnp.mean(w * jnp.abs(err)), jnp.mean(w * err ** 2)
    commit = jnp.mean((features - jax.lax.stop_gradient(codes.quantized)) ** 2)
    loss = config.l1_weight * l1 + config.mse_weight * mse + config.commitment_weight * commit
    clipped_mse = jnp.mean((jnp.clip(recon, -1, 1) - pixels) ** 2)
    return loss, {"loss": loss, "l1": l1, "mse": mse, "commit": commit, "clipped_mse": clipped_mse}


def make_optimizer(model: image_tokenizer.ImageTokenizer, config) -> nnx.Optimizer:
    lr = optax.warmup_cosine_decay_schedule(0.0, config.lr, config.warmup_steps,
                                            max(config.num_steps, config.warmup_steps + 1),
                                            config.lr * config.end_lr_ratio)
    tx = optax.chain(optax.clip_by_global_norm(config.grad_clip),
                     optax.adamw(lr, b1=config.b1, b2=config.b2, weight_decay=config.weight_decay))
    return nnx.Optimizer(model, tx, wrt=nnx.Param)


def _state_manager(workdir: pathlib.Path) -> ocp.CheckpointManager:
    return ocp.CheckpointManager(workdir / TRAIN_STATE, item_names=("opt",))


def _resume_step(workdir: pathlib.Path) -> int | None:
    """Newest step with both params (checkpoints/) and optimizer state (train_state/), or None."""
    params_root = workdir / "checkpoints"
    if not params_root.is_dir():
        return None
    params_steps = {int(p.name) for p in params_root.iterdir() if p.name.isdigit()}
    with _state_manager(workdir) as mngr:
        both = params_steps & set(mngr.all_steps())
    return max(both) if both else None


def save(workdir: pathlib.Path, step: int, model, optimizer, config) -> None:
    """Optimizer state first, then params + config: a step with params is complete."""
    with _state_manager(workdir) as mngr:
        mngr.save(step, args=ocp.args.Composite(opt=ocp.args.StandardSave(nnx.state(optimizer))))
        mngr.wait_until_finished()
    checkpoint.save_params(workdir / "checkpoints", image_tokenizer.param_dict(model), config, step=step)


def restore_optimizer(workdir: pathlib.Path, step: int, optimizer) -> None:
    target = jax.tree.map(ocp.utils.to_shape_dtype_struct, nnx.state(optimizer))
    with _state_manager(workdir) as mngr:
        restored = mngr.restore(step, args=ocp.args.Composite(opt=ocp.args.StandardRestore(target)))["opt"]
    nnx.update(optimizer, restored)


def train(config: ml_collections.ConfigDict, workdir) -> dict:
    """Runs (or resumes) training to `config.num_steps`; returns the last logged metrics."""
    workdir = pathlib.Path(workdir).expanduser().resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    if config.kind != image_tokenizer.KIND:
        raise ValueError(f"the toy tokenizer trainer needs an {image_tokenizer.KIND!r} config, got kind "
                         f"{config.kind!r}")
    sched, size = train_schedule(config)
    start = _resume_step(workdir)
    if start is None:
        model = image_tokenizer.build(config.model, seed=config.seed)
    else:
        model = image_tokenizer.build(config.model, checkpoint.load_params(workdir / "checkpoints" / str(start))[1])
    optimizer = make_optimizer(model, config)
    if start is not None:
        restore_optimizer(workdir, start, optimizer)
        print(f"resumed from {workdir} at step {start}", flush=True)
    start = start or 0
    n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(image_tokenizer.param_dict(model)))
    print(f"toy tokenizer: {n_params:,} parameters, {size}x{size} px, {len(sched)} scales up to {sched[-1]}, "
          f"d={config.model.codebook_dim}, batch {config.batch_size}, steps {start}..{config.num_steps}", flush=True)

    @nnx.jit
    def train_step(model, optimizer, pixels):
        (_, metrics), grads = nnx.value_and_grad(loss_fn, has_aux=True)(model, pixels, sched, config)
        optimizer.update(model, grads)
        return dict(metrics, grad_norm=optax.tree.norm(grads))

    @nnx.jit
    def eval_mse(model, pixels):
        return jnp.mean((model.decode(model.quantize(model.encode(pixels), sched).quantized) - pixels) ** 2)

    eval_images = toy_images(config.data.eval_seed, 0, config.data.eval_images, size)
    metrics, last = {}, {}
    t0, step = time.time(), start
    with open(workdir / "metrics.jsonl", "a") as log:
        for step in range(start, config.num_steps):
            batch = toy_images(config.data.seed, step * config.batch_size, config.batch_size, size)
            metrics = train_step(model, optimizer, jnp.asarray(batch))
            done = step + 1
            if done % config.log_every == 0 or done == config.num_steps:
                last = {k: float(v) for k, v in metrics.items()}
                last["psnr"] = images.psnr_from_mse(last.pop("clipped_mse"), data_range=2.0)
                if not np.isfinite(last["loss"]):
                    raise FloatingPointError(f"loss is {last['loss']} at step {done}")
                rate = (done - start) / (time.time() - t0)
                last.update(step=done, steps_per_s=rate)
                if done % config.checkpoint_every == 0 or done == config.num_steps:
                    last["eval_psnr"] = images.psnr_from_mse(float(eval_mse(model, jnp.asarray(eval_images))), 2.0)
                log.write(json.dumps(last) + "\n")
                log.flush()
                print(f"step {done}/{config.num_steps} loss {last['loss']:.4f} l1 {last['l1']:.4f} "
                      f"commit {last['commit']:.4f} psnr {last['psnr']:.2f} dB"
                      + (f" eval_psnr {last['eval_psnr']:.2f} dB" if "eval_psnr" in last else "")
                      + f" ({rate:.2f} steps/s)", flush=True)
            if done % config.checkpoint_every == 0 or done == config.num_steps:
                save(workdir, done, model, optimizer, config)
    if start >= config.num_steps:
        print(f"nothing to do: {workdir} is already at step {start} >= num_steps {config.num_steps}", flush=True)
    return last


def main(argv, config: ml_collections.ConfigDict | None, workdir: str | None) -> int:
    logging.set_verbosity(logging.WARNING)  # orbax logs every checkpoint step at INFO
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if config is None or not workdir:
        print("error: --config and --workdir are required", file=sys.stderr)
        return 2
    try:
        train(config, workdir)
    except (ValueError, FileNotFoundError, ImportError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":  # flags are defined here only, so importing this module defines none
    _CONFIG = config_flags.DEFINE_config_file("config", None, "configs/*.py training config", lock_config=True)
    _WORKDIR = flags.DEFINE_string("workdir", None, "output / resume directory")
    app.run(lambda argv: sys.exit(main(argv, _CONFIG.value, _WORKDIR.value)), flags_parser=configlib.parse_flags)
