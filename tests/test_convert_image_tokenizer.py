"""Tokenizer weight conversion: the key table, import/export round trips (exact on the fixture files), official
file spellings and nestings, refusal of mismatched files (nothing written), the CLI and `load_tokenizer`."""
import os
import re
import subprocess
import sys

import jax
import numpy as np
import pytest
import safetensors.numpy

from helpers import REPO_ROOT, fixture_dir, load_index
from varedit_jax import checkpoint, configlib, image_tokenizer, loading, state_dicts
from varedit_jax.convert import image_tokenizer as cv

FAMILIES = ["vae", "vae_d56"]
TINY = dict(base_ch=32, ch_mult=(1, 2, 2), num_res_blocks=1, patch_size=4, codebook_dim=6)


def _weights(folder):
    path = fixture_dir(folder)
    index = load_index(path / "config.json")
    return path, index, path / index.get("weights", "weights.safetensors")


def _flat(params) -> dict:
    return {"/".join(str(getattr(k, "key", k)) for k in p): np.asarray(v)
            for p, v in jax.tree_util.tree_flatten_with_path(params)[0]}


def _assert_same_params(a, b):
    fa, fb = _flat(a), _flat(b)
    assert fa.keys() == fb.keys()
    for k in fa:
        np.testing.assert_array_equal(fa[k], fb[k], err_msg=k)


def _unwrap(name: str) -> str:
    """The "unwrapped" spelling the official load_cnn also accepts."""
    return re.sub(r"\.(conv|norm)\.(weight|bias)$", r".\2", name)


def _run_cli(*args):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    return subprocess.run([sys.executable, "-m", "varedit_jax.convert", *args], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=600)


# ---------------------------------------------------------------------------------------------------------------
# Without fixtures
# ---------------------------------------------------------------------------------------------------------------

def test_canonical_spellings():
    assert cv.canonical_key("encoder.conv_in.weight") == "encoder.conv_in.conv.weight"
    assert cv.canonical_key("encoder.down.0.downsample.conv.weight") == "encoder.down.0.downsample.conv.conv.weight"
    assert cv.canonical_key("decoder.up.1.block.0.nin_shortcut.bias") == "decoder.up.1.block.0.nin_shortcut.conv.bias"
    assert cv.canonical_key("encoder.mid.block_1.norm2.weight") == "encoder.mid.block_1.norm2.norm.weight"
    for wrapped in ("encoder.conv_in.conv.weight", "encoder.down.0.downsample.conv.conv.bias",
                    "decoder.norm_out.norm.weight", "quantizer.lfq.mask"):
        assert cv.canonical_key(wrapped) == wrapped


def test_official_d32_key_count():
    config = configlib.load(REPO_ROOT / "configs/image_tokenizer_d32.py")
    shapes = cv.expected_shapes(config.model)
    assert shapes["encoder.conv_out.conv.weight"] == (32, 512, 3, 3) and shapes["quantize.lfq.mask"] == (32,)
    assert shapes["encoder.down.1.block.0.nin_shortcut.conv.weight"] == (256, 128, 1, 1)
    assert shapes["decoder.up.0.block.0.conv1.conv.weight"] == (128, 256, 3, 3)
    assert "decoder.up.0.upsample.conv.conv.weight" not in shapes
    assert "encoder.down.4.downsample.conv.conv.weight" not in shapes


def test_random_model_round_trip_and_config_inference(tmp_path):
    cfg = image_tokenizer.default_model_config(**TINY)
    model = image_tokenizer.build(cfg)
    params = image_tokenizer.param_dict(model)
    sd = cv.export_weights(cfg, params)
    assert sd["quantize.lfq.mask"].dtype == np.int64 and list(sd["quantizer.lfq.mask"]) == [32, 16, 8, 4, 2, 1]
    config, back = cv.import_weights(sd)
    _assert_same_params(params, back)
    assert config.kind == "image_tokenizer" and tuple(config.model.ch_mult) == TINY["ch_mult"]
    assert all(config.model[k] == v for k, v in TINY.items() if k != "ch_mult")
    # through an orbax checkpoint (list indices come back as strings) the export is identical
    stored_config, stored = checkpoint.load_params(checkpoint.save_params(tmp_path / "ckpt", params, config))
    again = cv.export_weights(stored_config, stored)
    assert again.keys() == sd.keys() and all(np.array_equal(again[k], sd[k]) for k in sd)


def test_non_tokenizer_state_dict_is_refused():
    with pytest.raises(state_dicts.StateDictMismatch, match="not a BSQ tokenizer"):
        cv.import_weights({"head.weight": np.zeros((4, 4), np.float32)})


# ---------------------------------------------------------------------------------------------------------------
# The fixture weight files
# ---------------------------------------------------------------------------------------------------------------

@pytest.mark.parity
@pytest.mark.parametrize("folder", FAMILIES)
def test_import_export_is_exact_on_fixture_weights(folder):
    path, index, weights = _weights(folder)
    original = safetensors.numpy.load_file(weights)
    config, params = cv.import_weights(weights)  # no config: the architecture comes from the weights
    exported = cv.export_weights(config, params)
    assert set(exported) == set(original)
    for key, value in original.items():
        assert exported[key].dtype == value.dtype and exported[key].shape == value.shape, key
        np.testing.assert_array_equal(exported[key], value, err_msg=key)
    fields = index["config"]
    for name in ("base_ch", "patch_size", "codebook_dim"):
        assert config.model[name] == fields[name], name
    assert tuple(config.model.ch_mult) == tuple(fields["ch_mult"])
    assert {k: list(v) for k, v in cv.expected_shapes(config.model).items()} == index["state_dict_keys"]
    n = sum(int(np.prod(v.shape)) for v in jax.tree.leaves(params))
    assert n == index["num_params"]
    given = cv.config_from_file(path / "config.json")
    assert bool(given.model.patchify) == bool(fields["patchify"])
    _, params_given = cv.import_weights(weights, given)
    _assert_same_params(params, params_given)


@pytest.mark.parity
@pytest.mark.parametrize("folder", FAMILIES)
def test_official_spellings_and_nestings(folder, tmp_path):
    _, _, weights = _weights(folder)
    original = safetensors.numpy.load_file(weights)
    _, params = cv.import_weights(weights)
    unwrapped = {_unwrap(k): v for k, v in original.items()}
    assert unwrapped.keys() != original.keys()
    _, back = cv.import_weights(unwrapped)
    _assert_same_params(params, back)
    safetensors.numpy.save_file(unwrapped, str(tmp_path / "unwrapped.safetensors"))
    _assert_same_params(params, cv.import_weights(tmp_path / "unwrapped.safetensors")[1])
    no_masks = {k: v for k, v in original.items() if k not in cv.MASK_KEYS}
    _assert_same_params(params, cv.import_weights(no_masks)[1])  # the unused buffers are optional

    torch = pytest.importorskip("torch", reason="reading .pth files needs the torch extra")
    as_torch = lambda sd: {k: torch.from_numpy(np.array(v)) for k, v in sd.items()}
    for name, obj in {"flat": as_torch(original), "vae": {"vae": as_torch(original), "step": 3},
                      "ema": {"ema": as_torch(unwrapped)}}.items():
        torch.save(obj, tmp_path / f"{name}.pth")
        _assert_same_params(params, cv.import_weights(tmp_path / f"{name}.pth")[1])


@pytest.mark.parity
@pytest.mark.parametrize("folder", FAMILIES)
def test_mismatched_files_are_refused(folder):
    path, _, weights = _weights(folder)
    original = safetensors.numpy.load_file(weights)
    victim = "decoder.up.0.block.1.conv2.conv.weight"
    with pytest.raises(state_dicts.StateDictMismatch, match=re.escape(victim)):
        cv.import_weights({k: v for k, v in original.items() if k != victim})
    with pytest.raises(state_dicts.StateDictMismatch, match="unexpected keys.*decoder.extra.weight"):
        cv.import_weights({**original, "decoder.extra.weight": np.zeros(3, np.float32)})
    with pytest.raises(state_dicts.StateDictMismatch, match="first shape mismatch: " + re.escape(victim)):
        cv.import_weights({**original, victim: original[victim][:, :-1]})
    with pytest.raises(state_dicts.StateDictMismatch, match="given twice"):
        cv.import_weights({**original, _unwrap(victim): original[victim]})
    config = cv.config_from_file(path / "config.json")
    config.model = image_tokenizer.default_model_config(**{**config.model.to_dict(), "codebook_dim": 3})
    with pytest.raises(state_dicts.StateDictMismatch, match="codebook_dim: config 3 vs weights"):
        cv.import_weights(weights, config)
    with pytest.raises(state_dicts.StateDictMismatch, match="lfq.mask"):
        cv.import_weights({**original, "quantize.lfq.mask": original["quantize.lfq.mask"][::-1].copy()})


@pytest.mark.parity
def test_cli_round_trip_refusal_and_load_tokenizer(tmp_path):
    path, _, weights = _weights("vae")
    original = safetensors.numpy.load_file(weights)
    bad = tmp_path / "bad.safetensors"
    safetensors.numpy.save_file({k: v for k, v in original.items() if "mid.block_2" not in k}, str(bad))
    result = _run_cli("import", "--kind", "image_tokenizer", "--src", str(bad), "--out", str(tmp_path / "refused"))
    assert result.returncode == 2 and "missing keys" in result.stderr and "mid.block_2" in result.stderr
    assert not (tmp_path / "refused").exists()

    result = _run_cli("import", "--kind", "image_tokenizer", "--src", str(weights), "--out", str(tmp_path / "ckpt"),
                      "--config", str(path / "config.json"))
    assert result.returncode == 0, result.stderr
    result = _run_cli("export", "--checkpoint", str(tmp_path / "ckpt"), "--out", str(tmp_path / "out.safetensors"))
    assert result.returncode == 0, result.stderr
    exported = safetensors.numpy.load_file(tmp_path / "out.safetensors")
    assert exported.keys() == original.keys()
    assert all(exported[k].dtype == original[k].dtype and np.array_equal(exported[k], original[k]) for k in original)

    from_ckpt, from_file = loading.load_image_tokenizer(tmp_path / "ckpt"), loading.load_image_tokenizer(weights)
    _assert_same_params(image_tokenizer.param_dict(from_ckpt), image_tokenizer.param_dict(from_file))
    assert from_ckpt.config == from_file.config
    checkpoint.save_params(tmp_path / "other", {"w": np.zeros(2, np.float32)},
                           configlib.override(cv.config_from_file(path / "config.json"), {"kind": "t5"}))
    with pytest.raises(ValueError, match="not one of image tokenizer kind"):
        loading.load_image_tokenizer(tmp_path / "other")
    with pytest.raises(FileNotFoundError):
        loading.load_image_tokenizer(tmp_path / "nothing_here")
