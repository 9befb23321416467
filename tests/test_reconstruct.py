"""`python -m varedit_jax.reconstruct`: preprocessing, the CLI on a tiny tokenizer checkpoint, and its errors."""
import os
import re
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from helpers import REPO_ROOT
from varedit_jax import checkpoint, reconstruct, schedules, image_tokenizer
from varedit_jax.convert import image_tokenizer as cv

TINY = dict(base_ch=32, ch_mult=(1, 2), num_res_blocks=1, patch_size=2, codebook_dim=8)


def _cli(*args):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    return subprocess.run([sys.executable, "-m", "varedit_jax.reconstruct", *args], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    model_cfg = image_tokenizer.default_model_config(**TINY)
    model = image_tokenizer.build(model_cfg)
    config, _ = cv.import_weights(cv.export_weights(model_cfg, image_tokenizer.param_dict(model)))
    path = tmp_path_factory.mktemp("tok") / "ckpt"
    checkpoint.save_params(path, image_tokenizer.param_dict(model), config)
    return path


def _image(path, width, height):
    yy, xx = np.mgrid[0:height, 0:width]
    rgb = np.stack([xx * 255 // width, yy * 255 // height, (xx + yy) % 256], -1).astype(np.uint8)
    Image.fromarray(rgb).save(path)
    return rgb


def test_target_size_follows_template_resolution_and_stride():
    img = Image.new("RGB", (100, 70))
    template, sched, size = reconstruct.target_schedule(img, 256, stride=2)
    assert template == schedules.nearest_template(0.7) and sched == schedules.scale_schedule(template, "0.06M")
    assert size == schedules.pixel_size(sched, 2)


def test_cli_reconstructs_and_reports(tiny_checkpoint, tmp_path):
    _image(tmp_path / "in.png", 100, 70)
    result = _cli("--image_tokenizer", str(tiny_checkpoint), "--image", str(tmp_path / "in.png"), "--resolution", "256",
                  "--out", str(tmp_path / "out.png"))
    assert result.returncode == 0, result.stderr
    template = schedules.nearest_template(70 / 100)
    sched = schedules.scale_schedule(template, "0.06M")
    h, w = schedules.pixel_size(sched, 2)
    with Image.open(tmp_path / "out.png") as out:
        assert out.size == (w, h) and out.mode == "RGB"
    lines = [line for line in result.stdout.splitlines() if re.match(r"\s+scale\s+\d+:", line)]
    assert len(lines) == len(sched)
    assert f"total {schedules.num_tokens(sched) * TINY['codebook_dim']} bits" in result.stdout
    assert re.search(r"PSNR -?\d+\.\d+ dB", result.stdout) and "compile" in result.stdout


def test_cli_errors_are_one_line_exit_2(tiny_checkpoint, tmp_path):
    (tmp_path / "broken.png").write_text("not an image")
    _image(tmp_path / "ok.png", 32, 32)
    (tmp_path / "junk.safetensors").write_bytes(os.urandom(256))
    cases = {
        "cannot decode image": ["--image_tokenizer", str(tiny_checkpoint), "--image", str(tmp_path / "broken.png")],
        "no image at": ["--image_tokenizer", str(tiny_checkpoint), "--image", str(tmp_path / "missing.png")],
        "cannot read weights": ["--image_tokenizer", str(tmp_path / "junk.safetensors"), "--image", str(tmp_path / "ok.png")],
        "no image tokenizer weights or checkpoint": ["--image_tokenizer", str(tmp_path / "nowhere"), "--image", str(tmp_path / "ok.png")],
    }
    for message, args in cases.items():
        result = _cli(*args, "--out", str(tmp_path / "out.png"))
        assert result.returncode == 2, (message, result.stderr)
        errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and message in errors[0], (message, result.stderr)
    assert not (tmp_path / "out.png").exists()
