"""The toy tokenizer trainer: a short run lowers the loss, re-running resumes (exactly), the workdir is an image tokenizer,
and the CLI takes config-flag overrides."""
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from helpers import REPO_ROOT
from varedit_jax import checkpoint, configlib, loading
from varedit_jax.assets import toy_image_tokenizer

TINY_MODEL = dict(base_ch=16, ch_mult=(1, 2), num_res_blocks=1, patch_size=2, norm_groups=4)  # 32 x 32 px images
TINY_TRAIN = {"batch_size": 4, "num_steps": 6, "log_every": 1, "checkpoint_every": 3, "warmup_steps": 2, "lr": 3e-3,
              "end_lr_ratio": 1.0, "data.eval_images": 4}  # constant LR after warmup: runs of any length agree


def _config(**overrides):
    values = {**{f"model.{k}": v for k, v in TINY_MODEL.items()}, **TINY_TRAIN, **overrides}
    return configlib.override(configlib.load(REPO_ROOT / "configs/toy_image_tokenizer.py"), values)


def _cli(workdir, *extra):
    flags = [f"--config.{k}={v}".replace(" ", "") for k, v in
             {**{f"model.{k}": v for k, v in TINY_MODEL.items()}, **TINY_TRAIN}.items()]
    return subprocess.run([sys.executable, "-m", "varedit_jax.assets.toy_image_tokenizer", "--config",
                           "configs/toy_image_tokenizer.py",
                           "--workdir", str(workdir), *flags, *extra], cwd=REPO_ROOT,
                          env=dict(os.environ, JAX_PLATFORMS="cpu"), capture_output=True, text=True, timeout=600)


def _metrics(workdir):
    return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def resumed_run(tmp_path_factory):
    """6 steps through the CLI, then an in-process call to 8 steps in the same workdir (which must resume at 6)."""
    workdir = tmp_path_factory.mktemp("toy_tok")
    cli = _cli(workdir)
    resumed = toy_image_tokenizer.train(_config(num_steps=8), workdir)
    return workdir, cli, resumed


def test_cli_run_lowers_the_loss_and_writes_checkpoints(resumed_run):
    workdir, cli, _ = resumed_run
    assert cli.returncode == 0, cli.stderr
    assert "step 6/6" in cli.stdout and "eval_psnr" in cli.stdout
    logged = [m for m in _metrics(workdir) if m["step"] <= 6]
    assert [m["step"] for m in logged] == [1, 2, 3, 4, 5, 6]
    assert np.mean([m["loss"] for m in logged[-2:]]) < np.mean([m["loss"] for m in logged[:2]])
    assert sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit()) == [3, 6, 8]


def test_rerunning_resumes_and_the_workdir_is_a_tokenizer(resumed_run, capsys):
    workdir, _, resumed = resumed_run
    assert [m["step"] for m in _metrics(workdir)] == [1, 2, 3, 4, 5, 6, 7, 8]
    assert resumed["step"] == 8 and np.isfinite(resumed["eval_psnr"])
    assert checkpoint.resolve(workdir) == (workdir / "checkpoints", 8)
    model = loading.load_image_tokenizer(workdir)
    assert model.stride == 2 and model.codebook_dim == 16
    config = checkpoint.load_config(workdir)
    assert config.kind == "image_tokenizer" and config.num_steps == 8
    toy_image_tokenizer.train(_config(num_steps=8), workdir)
    assert "already at step 8" in capsys.readouterr().out


@pytest.mark.slow
def test_resume_is_exact(resumed_run, tmp_path):
    workdir, _, _ = resumed_run
    toy_image_tokenizer.train(_config(num_steps=8), tmp_path)  # the same 8 steps without interruption
    _, straight = checkpoint.load_params(tmp_path)
    _, resumed = checkpoint.load_params(workdir)
    for a, b in zip(jax.tree.leaves(straight), jax.tree.leaves(resumed)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)


def test_cli_refuses_a_bad_config(tmp_path):
    bad = _cli(tmp_path, "--config.model.norm_groups=5")
    assert bad.returncode == 2 and "norm_groups=5" in bad.stderr
    assert not (tmp_path / "checkpoints").exists()
