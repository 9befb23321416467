"""The toy asset cache (varedit_jax/assets.py): keyed by what determines each asset, reused, built once when
processes race, and `resolve` filling only the empty paths of a config."""
import os
import pathlib
import subprocess
import sys

import pytest

from helpers import REPO_ROOT
from varedit_jax import assets, configlib, text


@pytest.fixture()
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("VAREDIT_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def _in_subprocesses(code: str, n: int, cache: pathlib.Path) -> list[str]:
    env = dict(os.environ, JAX_PLATFORMS="cpu", VAREDIT_CACHE=str(cache))
    procs = [subprocess.Popen([sys.executable, "-c", code], cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for _ in range(n)]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0] * n, outs
    return outs


def test_racing_processes_build_each_asset_once(cache):
    code = ("from varedit_jax import assets; print('PATH', assets.toy_dataset(6, 3, 64)); "
            "print('PATH', assets.toy_text_encoder_dir(0))")
    outs = _in_subprocesses(code, 2, cache)
    joined = "".join(outs)
    assert joined.count("[assets] building the toy dataset") == 1, outs
    assert joined.count("[assets] building the toy text encoder") == 1, outs
    paths = [[pathlib.Path(line.split()[1]) for line in out.splitlines() if line.startswith("PATH")] for out in outs]
    assert paths[0] == paths[1] and len(paths[0]) == 2
    data_dir, text_dir = paths[0]
    assert (data_dir / "dataset.json").is_file() and data_dir.parent == cache.resolve()
    assert (text_dir / text.SPIECE_FILE).is_file()


def test_assets_are_keyed_by_their_settings_and_reused(cache, capsys):
    first = assets.toy_dataset(4, 0, 64)
    assert "building" in capsys.readouterr().out
    assert assets.toy_dataset(4, 0, 64) == first and "building" not in capsys.readouterr().out
    other = assets.toy_dataset(4, 1, 64)
    assert other != first and (other / "dataset.json").is_file()


def test_toy_image_tokenizer_is_trained_once_per_setting(cache, monkeypatch):
    calls = []

    def fake_train(config, workdir):  # what toy_image_tokenizer.train leaves behind: checkpoints/<num_steps>/
        calls.append(config.num_steps)
        (pathlib.Path(workdir) / "checkpoints" / str(config.num_steps)).mkdir(parents=True)

    monkeypatch.setattr(assets.toy_image_tokenizer, "train", fake_train)
    a = assets.toy_image_tokenizer_workdir(5, 0)
    assert assets.toy_image_tokenizer_workdir(5, 0) == a and calls == [5]
    b = assets.toy_image_tokenizer_workdir(7, 0)
    assert b != a and calls == [5, 7]


def test_resolve_fills_only_empty_paths(cache, monkeypatch):
    config = configlib.load(REPO_ROOT / "configs/varedit_tiny.py")
    config.toy.num_pairs, config.toy.eval_pairs = 4, 2
    config.image_tokenizer.path, config.text.path = "/models/image_tokenizer", "/models/t5"
    monkeypatch.setattr(assets, "toy_image_tokenizer_workdir", lambda *a: pytest.fail("image_tokenizer.path was given"))
    resolved = assets.resolve(config)
    assert (resolved.image_tokenizer.path, resolved.text.path) == ("/models/image_tokenizer", "/models/t5")
    assert resolved.data.spiece_model == str(pathlib.Path("/models/t5") / text.SPIECE_FILE)
    train_dir, eval_dir = pathlib.Path(resolved.data.paths[0]), pathlib.Path(resolved.eval_data.paths[0])
    assert train_dir.is_absolute() and train_dir != eval_dir and train_dir.parent == cache.resolve()
    assert resolved.data.stride == assets.TOY_STRIDE
    assert not config.data.paths  # the input config is not modified
    config.data.paths = ("/data/mine",)
    assert assets.resolve(config).data.paths == ("/data/mine",)
