"""The tiny default's assets, built once and reused: the toy dataset (train + eval splits), the toy image tokenizer
(`assets.toy_image_tokenizer`, trained here) and the toy text encoder (`assets.toy_text_encoder`).

They live in a cache directory (`$VAREDIT_CACHE`, default `~/.cache/varedit_jax`), one folder per asset named by a
hash of everything that determines it, so a changed setting builds a new one and an unchanged one is reused across
runs, sweeps and processes. A file lock per asset makes concurrent processes build it once; a build interrupted
half-way is resumed or redone (each builder is itself resumable / atomic).

`resolve(config)` fills the empty paths of a training config (`image_tokenizer.path`, `text.path`, `data.paths`,
`data.spiece_model`, `eval_data.paths`) from `config.toy` and returns a copy; configs that name real assets pass
through unchanged. A multi-process run builds them first in a single-process child (`build_in_child`), before
joining `jax.distributed`: the builders' JAX work and checkpoint barriers must not involve the other processes.
"""
import contextlib
import fcntl
import hashlib
import json
import os
import pathlib
import subprocess
import sys

import ml_collections

from data_pipelines import build as data_build
from data_pipelines import toy
from varedit_jax import configlib, schedules, text
from varedit_jax.assets import toy_image_tokenizer, toy_text_encoder

REPO = pathlib.Path(__file__).resolve().parent.parent.parent
TOY_IMAGE_TOKENIZER_CONFIG = REPO / "configs" / "toy_image_tokenizer.py"
TOY_TEXT_CONFIG = REPO / "configs" / "toy_text.py"
TOY_STRIDE = 4


def cache_dir() -> pathlib.Path:
    return pathlib.Path(os.environ.get("VAREDIT_CACHE") or "~/.cache/varedit_jax").expanduser().resolve()


def _digest(spec: dict) -> str:
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:12]


@contextlib.contextmanager
def _locked(path: pathlib.Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def toy_dataset(num: int, seed: int, size: int) -> pathlib.Path:
    """A toy record dataset of `num` pairs at `size` px (`data_pipelines.build --format toy`)."""
    out = cache_dir() / f"toy_data-{_digest(dict(num=num, seed=seed, size=size))}"
    with _locked(out):
        if not (out / "dataset.json").is_file():
            print(f"[assets] building the toy dataset ({num} pairs, {size} px, seed {seed}) in {out}", flush=True)
            args = ["--format", "toy", "--out", str(out), "--num", str(num), "--size", str(size), "--seed", str(seed)]
            if data_build.main(args) != 0:
                raise RuntimeError(f"building the toy dataset in {out} failed (see above)")
    return out


def toy_image_tokenizer_workdir(steps: int, seed: int) -> pathlib.Path:
    """A toy image tokenizer workdir (`configs/toy_image_tokenizer.py` trained for `steps` steps on toy images)."""
    config = configlib.load(TOY_IMAGE_TOKENIZER_CONFIG)
    config.num_steps, config.seed = steps, seed
    config.checkpoint_every = min(config.checkpoint_every, steps)
    out = cache_dir() / f"toy_image_tokenizer-{_digest(config.to_dict())}"
    with _locked(out):
        done = out / "checkpoints" / str(steps)
        if not done.is_dir():
            print(f"[assets] training the toy image tokenizer ({steps} steps) in {out}", flush=True)
            toy_image_tokenizer.train(config, out)
    return out


def toy_corpus(seed: int, num: int = 1000) -> list[str]:
    """Instructions of the toy task (its whole small vocabulary), for the toy text encoder's sentencepiece model."""
    return [toy.render_pair(seed, i, toy.MIN_SIZE * 2)["instruction"] for i in range(num)]


def toy_text_encoder_dir(seed: int) -> pathlib.Path:
    """A toy T5 encoder folder of `configs/toy_text.py`'s sizes (random weights, sentencepiece on the toy
    instructions; `toy_text_encoder.build`)."""
    m = configlib.load(TOY_TEXT_CONFIG).model
    sizes = dict(d_model=m.d_model, d_kv=m.d_kv, num_heads=m.num_heads, d_ff=m.d_ff, num_layers=m.num_layers,
                 vocab_size=m.vocab_size)
    out = cache_dir() / f"toy_text_encoder-{_digest(dict(sizes, seed=seed))}"
    with _locked(out):
        if not (out / toy_text_encoder.MANIFEST).is_file():
            print(f"[assets] building the toy text encoder (width {m.d_model}) in {out}", flush=True)
            toy_text_encoder.build(out, toy_corpus(seed), seed=seed, **sizes)
    return out


def resolve(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """A copy of a training config with every empty asset path filled from `config.toy` (absolute paths)."""
    config = ml_collections.ConfigDict(config.to_dict())
    t = config.toy
    size = schedules.pixel_size(schedules.scale_schedule(config.data.templates[0], config.data.pn), TOY_STRIDE)[0]
    if not config.image_tokenizer.path:
        config.image_tokenizer.path = str(toy_image_tokenizer_workdir(t.image_tokenizer_steps, t.seed))
    if not config.text.path:
        config.text.path = str(toy_text_encoder_dir(t.seed))
    if not config.data.paths:
        config.data.paths = (str(toy_dataset(t.num_pairs, t.seed, size)),)
        config.data.stride = TOY_STRIDE
    if not config.eval_data.paths:
        config.eval_data.paths = (str(toy_dataset(t.eval_pairs, t.eval_seed, size)),)
    for d in (config.data, config.eval_data):
        if not d.spiece_model:
            d.spiece_model = str(pathlib.Path(config.text.path) / text.SPIECE_FILE)
    return config


def build_in_child(config: ml_collections.ConfigDict) -> None:
    """Builds (or finds) the toy assets `resolve` would fill in, in a child interpreter (`python -m
    varedit_jax.assets`, config JSON on stdin); a no-op for configs that name every asset."""
    if all((config.image_tokenizer.path, config.text.path, config.data.paths, config.eval_data.paths)):
        return
    proc = subprocess.run([sys.executable, "-m", "varedit_jax.assets"], input=config.to_json(), text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"building the toy assets failed (exit code {proc.returncode}; see above)")
