"""Conversion of official Infinity / VAREdit transformer weights: exact import -> export round trips of every fixture
weight file (no config), both parameter layouts, all source formats, refusals with named keys, the CLI."""
import functools
import json
import subprocess
import sys

import jax
import ml_collections
import numpy as np
import pytest
import safetensors.numpy

from helpers import REPO_ROOT, fixture_dir, fixtures_root
from transformer_cases import KIND_OF_FOLDER, folder_config, random_params
from varedit_jax import checkpoint, transformer
from varedit_jax.convert import infinity as conv
from varedit_jax import state_dicts
from varedit_jax.convert.__main__ import main as cli


def _fixture_weights():
    params = []
    for name, kind in KIND_OF_FOLDER.items():
        path = fixtures_root() / name / "weights.safetensors"
        params.append(pytest.param(name, kind, id=name, marks=[] if path.is_file() else
                                   pytest.mark.skip(reason=f"no {path}")))
    return params


def _assert_same(got: dict, want: dict):
    assert sorted(got) == sorted(want)
    for key in want:
        assert got[key].dtype == want[key].dtype and got[key].shape == want[key].shape, key
        np.testing.assert_array_equal(got[key], want[key], err_msg=key)


@pytest.mark.parity
@pytest.mark.parametrize("name,kind", _fixture_weights())
def test_import_export_reproduces_the_fixture_file(name, kind):
    folder = fixture_dir(name)
    sd = state_dicts.read_state_dict(folder / "weights.safetensors")
    meta = folder_config(folder)
    for scan in (True, False):
        config = None if scan else conv.config_from_file(folder / "config.json", kind=kind)
        if config is not None:  # (its cfg_uncond_export_rows: the fixture's text_maxlen, the file's row count)
            config.model.scan_layers = False
        cfg, params = conv.import_weights(folder / "weights.safetensors", config, kind=kind)
        assert cfg.kind == kind and cfg.model.scan_layers == scan
        assert ("ada_gss" in params["blocks"]) == scan
        out = conv.export_weights(cfg, params)
        _assert_same(out, sd)
    depth = cfg.model.depth
    assert len(out) == 22 + 21 * depth == meta["n_state_dict_keys"]
    assert {k: list(v.shape) for k, v in out.items()} == meta["state_dict_shapes"]


@pytest.mark.parity
def test_fixture_config_is_checked_against_the_weights(tmp_path):
    folder = fixture_dir("varedit_transformer")
    given = conv.config_from_file(folder / "config.json", kind="varedit")
    assert given.conditioning == "sar"
    cfg, _ = conv.import_weights(folder / "weights.safetensors", given, kind="varedit")
    assert cfg.model.embed_dim == folder_config(folder)["constructor_kwargs"]["embed_dim"]
    with pytest.raises(state_dicts.StateDictMismatch, match="embed_dim: config 2048"):
        conv.import_weights(folder / "weights.safetensors",
                            conv.config_from_file(REPO_ROOT / "configs/varedit_2b_256.py", kind="varedit"))
    with pytest.raises(ValueError, match="not 'infinity'"):
        conv.config_from_file(REPO_ROOT / "configs/varedit_2b_256.py", kind="infinity")
    bad = json.loads((folder / "config.json").read_text())
    bad["constructor_kwargs"]["cos_attn"] = False
    (tmp_path / "config.json").write_text(json.dumps(bad))
    with pytest.raises(ValueError, match="cos_attn"):
        conv.config_from_file(tmp_path / "config.json", kind="varedit")


@functools.lru_cache(maxsize=None)
def _tiny(**overrides):
    base = dict(embed_dim=32, depth=4, num_heads=2, bits=4, text_dim=16, text_max_len=8, text_pool_heads=1)
    cfg = transformer.default_model_config(**{**base, "block_chunks": 2, **overrides})
    model = transformer.build(cfg, random_params(transformer.default_model_config(**base, block_chunks=1)))
    config = ml_collections.ConfigDict({"kind": "varedit", "conditioning": "sar", "model": cfg.to_dict()})
    return conv.export_weights(config, transformer.param_dict(model)), config, model


def _tiny_state_dict(**overrides) -> tuple[dict, ml_collections.ConfigDict, transformer.Infinity]:
    """(official state dict of a randomly initialised tiny model, its config, the model); a fresh dict per call."""
    sd, config, model = _tiny(**overrides)
    return dict(sd), ml_collections.ConfigDict(config.to_dict()), model


def test_a_model_trained_here_exports_the_official_key_set():
    sd, config, model = _tiny_state_dict(cfg_uncond_export_rows=512)
    assert len(sd) == 22 + 21 * 4 and sd["cfg_uncond"].shape == (512, 16)
    assert "block_chunks.1.module.1.sa.mat_qkv.weight" in sd and "blocks.0.ada_gss" not in sd
    assert not sd["cfg_uncond"][8:].any() and not sd["block_chunks.0.module.0.sa.zero_k_bias"].any()
    # q | k | v rows of mat_qkv: the q rows are the first C output features of the kernel
    kernel = np.asarray(model.blocks.sa.mat_qkv[...][0])  # (C, 3, C) of block 0
    np.testing.assert_array_equal(sd["block_chunks.0.module.0.sa.mat_qkv.weight"][:32], kernel[:, 0].T)
    # importing the 512-row file into the model's text_max_len truncates like the official loader
    cfg, params = conv.import_weights(sd, config, kind="varedit")
    np.testing.assert_array_equal(params["cfg_uncond"], np.asarray(model.cfg_uncond[...]))
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(transformer.param_dict(model))):
        np.testing.assert_array_equal(a, np.asarray(b))
    # block_chunks = 1 uses `blocks.{b}` names
    flat, _, _ = _tiny_state_dict(block_chunks=1)
    assert "blocks.3.ffn.fc2.bias" in flat and not any(k.startswith("block_chunks") for k in flat)
    cfg, params = conv.import_weights(flat, kind="varedit")
    assert cfg.model.block_chunks == 1 and cfg.model.depth == 4
    _assert_same(conv.export_weights(cfg, params), flat)


@pytest.mark.parametrize("edit,match", [
    (lambda sd: sd.pop("block_chunks.1.module.0.ffn.fc1.bias"), "missing keys.*block_chunks.1.module.0.ffn.fc1.bias"),
    (lambda sd: sd.__setitem__("block_chunks.0.module.0.sa.extra", np.zeros(3, np.float32)),
     "unexpected keys.*sa.extra"),
    (lambda sd: sd.__setitem__("head.bias", np.zeros(5, np.float32)), "shape mismatch: head.bias"),
    (lambda sd: sd.__setitem__("block_chunks.0.module.1.ca.zero_k_bias", np.ones(32, np.float32)), "zero_k_bias"),
    (lambda sd: sd.pop("pos_start"), "missing keys.*pos_start"),
])
def test_mismatched_state_dicts_are_refused_by_name(edit, match):
    sd, _, _ = _tiny_state_dict()
    edit(sd)
    with pytest.raises(state_dicts.StateDictMismatch, match=match):
        conv.import_weights(sd, kind="varedit")


def test_source_formats(tmp_path):
    sd, _, _ = _tiny_state_dict()
    # sharded HF folder with an index
    keys = sorted(sd)
    shards = {"model-00001-of-00002.safetensors": keys[:50], "model-00002-of-00002.safetensors": keys[50:]}
    folder = tmp_path / "hf"
    folder.mkdir()
    for shard, names in shards.items():
        safetensors.numpy.save_file({k: sd[k] for k in names}, folder / shard)
    (folder / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {k: shard for shard, names in shards.items() for k in names}}))
    cfg, params = conv.import_weights(folder, kind="varedit")
    _assert_same(conv.export_weights(cfg, params), sd)
    torch = pytest.importorskip("torch", reason=".pth files need the torch extra")
    nested = {"trainer": {"gpt_fsdp": {k: torch.from_numpy(v.copy()) for k, v in sd.items()}, "step": 3}}
    torch.save(nested, tmp_path / "ar-ckpt-last.pth")
    cfg, params = conv.import_weights(tmp_path / "ar-ckpt-last.pth", kind="infinity")
    assert cfg.kind == "infinity" and cfg.conditioning == "none"
    _assert_same(conv.export_weights(cfg, params), sd)
    torch.save({k: torch.from_numpy(v.copy()) for k, v in sd.items()}, tmp_path / "flat.pth")
    _assert_same(conv.export_weights(*conv.import_weights(tmp_path / "flat.pth", kind="varedit")), sd)


@pytest.mark.parity
def test_cli_round_trip_and_refusal(tmp_path, capsys):
    folder = fixture_dir("varedit_transformer")
    src = folder / "weights.safetensors"
    assert cli(["import", "--kind", "varedit", "--src", str(src), "--out", str(tmp_path / "ckpt")]) == 0
    assert checkpoint.load_config(tmp_path / "ckpt").conditioning == "sar"
    assert cli(["export", "--checkpoint", str(tmp_path / "ckpt"), "--out", str(tmp_path / "out.safetensors")]) == 0
    _assert_same(safetensors.numpy.load_file(tmp_path / "out.safetensors"), safetensors.numpy.load_file(src))
    bad = dict(safetensors.numpy.load_file(src))
    bad.pop("head.weight")
    safetensors.numpy.save_file(bad, tmp_path / "bad.safetensors")
    assert cli(["import", "--kind", "varedit", "--src", str(tmp_path / "bad.safetensors"),
                "--out", str(tmp_path / "never")]) == 2
    assert "head.weight" in capsys.readouterr().err and not (tmp_path / "never").exists()
    assert cli(["import", "--kind", "varedit", "--src", str(src), "--out", str(tmp_path / "never"),
                "--config", str(REPO_ROOT / "configs/varedit_2b_256.py")]) == 2
    assert "embed_dim" in capsys.readouterr().err and not (tmp_path / "never").exists()


@pytest.mark.parity
def test_cli_as_a_module(tmp_path):
    src = fixture_dir("infinity_transformer") / "weights.safetensors"
    run = lambda *a: subprocess.run([sys.executable, "-m", "varedit_jax.convert", *a], cwd=REPO_ROOT,  # noqa: E731
                                    capture_output=True, text=True, timeout=300)
    r = run("import", "--kind", "infinity", "--src", str(src), "--out", str(tmp_path / "ckpt"))
    assert r.returncode == 0, r.stderr
    r = run("export", "--checkpoint", str(tmp_path / "ckpt"), "--out", str(tmp_path / "x.safetensors"))
    assert r.returncode == 0, r.stderr
    _assert_same(safetensors.numpy.load_file(tmp_path / "x.safetensors"), safetensors.numpy.load_file(src))
