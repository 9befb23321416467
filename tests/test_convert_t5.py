"""flan-T5 conversion: HF folder -> params -> HF state dict round trip (exact), the CLI, the tokenizer carried by the
checkpoint, encoder-decoder checkpoints, configs, and refusals that name the keys and write nothing."""
import json
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest
import safetensors.numpy
from flax import nnx

from helpers import REPO_ROOT, fixture_dir
from varedit_jax import configlib, loading, state_dicts, text
from varedit_jax.params import param_dict
from varedit_jax.assets import toy_text_encoder
from varedit_jax.convert import t5


@pytest.fixture(scope="module")
def hf():
    folder = fixture_dir("t5")
    return folder, safetensors.numpy.load_file(folder / "model.safetensors")


def _copy(folder, out, sd=None, config_json=None):
    """A copy of an HF folder, optionally with another state dict / config.json."""
    out.mkdir(parents=True, exist_ok=True)
    for name in ("config.json", text.SPIECE_FILE):
        shutil.copy(folder / name, out / name)
    if sd is not None:
        safetensors.numpy.save_file(sd, out / "model.safetensors")
    else:
        shutil.copy(folder / "model.safetensors", out / "model.safetensors")
    if config_json is not None:
        (out / "config.json").write_text(json.dumps(config_json))
    return out


def _flat(tree) -> dict:
    return {jax.tree_util.keystr(path): leaf for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _assert_same_state_dict(got, want):
    assert sorted(got) == sorted(want)
    for k in want:
        assert got[k].dtype == want[k].dtype and got[k].shape == want[k].shape, k
        np.testing.assert_array_equal(got[k], want[k], err_msg=k)


@pytest.mark.parity
def test_import_export_round_trip_is_exact(hf):
    folder, sd = hf
    config, params = t5.import_weights(folder)
    hf_json = json.loads((folder / "config.json").read_text())
    for field in t5.HF_FIELDS:
        assert config.model[field] == hf_json[field], field
    assert text.spiece_proto(config) == (folder / text.SPIECE_FILE).read_bytes()
    _assert_same_state_dict(t5.export_weights(config, params), sd)
    assert len(sd) == 3 + 9 * config.model.num_layers


@pytest.mark.parity
def test_single_file_source_uses_the_files_beside_it(hf):
    folder, sd = hf
    config, params = t5.import_weights(folder / "model.safetensors")
    _assert_same_state_dict(t5.export_weights(config, params), sd)


@pytest.mark.parity
def test_cli_import_then_export(hf, tmp_path):
    folder, sd = hf
    ckpt, out = tmp_path / "ckpt", tmp_path / "t5.safetensors"
    run = lambda *a: subprocess.run([sys.executable, "-m", "varedit_jax.convert", *a], cwd=REPO_ROOT,  # noqa: E731
                                    capture_output=True, text=True)
    r = run("import", "--kind", "t5", "--src", str(folder), "--out", str(ckpt))
    assert r.returncode == 0, r.stderr
    r = run("export", "--checkpoint", str(ckpt), "--out", str(out))
    assert r.returncode == 0, r.stderr
    _assert_same_state_dict(safetensors.numpy.load_file(out), sd)

    # the checkpoint carries its tokenizer: it loads with no other file and encodes like the HF folder
    config, encoder, tok = loading.load_text_encoder(ckpt)
    _, ref_encoder, ref_tok = loading.load_text_encoder(folder)
    assert tok.proto == ref_tok.proto and config.text_max_len == text.DEFAULT_TEXT_MAX_LEN
    ids, mask = tok(["make the sky purple"], 8)
    np.testing.assert_array_equal(text.encode(encoder, ids, mask)[0], text.encode(ref_encoder, ids, mask)[0])

    # a refused import writes nothing and says why
    r = run("import", "--kind", "t5", "--src", str(folder), "--out", str(tmp_path / "bad"),
            "--config", str(REPO_ROOT / "configs" / "flan_t5_xl.py"))
    assert r.returncode == 2 and "d_model" in r.stderr and not (tmp_path / "bad").exists()


@pytest.mark.parity
def test_encoder_decoder_checkpoint_keeps_the_encoder(hf, tmp_path):
    """The released flan-t5-xl folder is a seq2seq checkpoint: decoder / lm_head ignored, embed_tokens tied."""
    folder, sd = hf
    full = dict(sd, **{"decoder.block.0.layer.0.SelfAttention.q.weight": sd["shared.weight"][:4],
                       "lm_head.weight": sd["shared.weight"], "encoder.embed_tokens.weight": sd["shared.weight"]})
    config, params = t5.import_weights(_copy(folder, tmp_path / "full", full))
    _assert_same_state_dict(t5.export_weights(config, params), sd)
    untied = dict(full, **{"encoder.embed_tokens.weight": sd["shared.weight"] + 1})
    with pytest.raises(state_dicts.StateDictMismatch, match="tied"):
        t5.import_weights(_copy(folder, tmp_path / "untied", untied))


@pytest.mark.parametrize("change,match", [
    ("missing", "missing keys.*encoder.block.0.layer.1.DenseReluDense.wo.weight"),
    ("unexpected", "unexpected keys.*encoder.block.0.layer.0.SelfAttention.extra.weight"),
    ("shape", "first shape mismatch: encoder.final_layer_norm.weight"),
    ("config_json", "config.json .* vs weights"),
    ("nan", "NaN"),
    ("no_spiece", "spiece.model"),
    ("bad_json", "malformed JSON"),
])
def test_mismatches_are_refused(hf, tmp_path, change, match):
    folder, sd = hf
    sd = dict(sd)
    hf_json = None
    if change == "missing":
        del sd["encoder.block.0.layer.1.DenseReluDense.wo.weight"]
    elif change == "unexpected":
        sd["encoder.block.0.layer.0.SelfAttention.extra.weight"] = sd["encoder.final_layer_norm.weight"]
    elif change == "shape":
        sd["encoder.final_layer_norm.weight"] = sd["encoder.final_layer_norm.weight"][:-1]
    elif change == "config_json":
        hf_json = dict(json.loads((folder / "config.json").read_text()), d_ff=7)
    elif change == "nan":
        sd["encoder.final_layer_norm.weight"] = np.full_like(sd["encoder.final_layer_norm.weight"], np.nan)
    src = _copy(folder, tmp_path / change, sd, hf_json)
    if change == "no_spiece":
        (src / text.SPIECE_FILE).unlink()
    elif change == "bad_json":
        (src / "config.json").write_text('{"model_type": "t5",')
    with pytest.raises((ValueError, FileNotFoundError), match=match):
        t5.import_weights(src)


def test_given_config_is_checked_and_supplies_the_rest(hf, tmp_path):
    folder, _ = hf
    base = t5.config_from_file(folder / "config.json")
    with pytest.raises(state_dicts.StateDictMismatch, match="layer_norm_epsilon"):
        given = configlib.override(base, {"model.layer_norm_epsilon": 1e-5})
        t5.import_weights(folder, given)
    given = configlib.override(base, {"model.dtype": "bfloat16", "text_max_len": 64})
    config, _ = t5.import_weights(folder, given)
    assert config.model.dtype == "bfloat16" and config.text_max_len == 64
    # without config.json the given config is required (max_distance / eps are not in the weights)
    bare = tmp_path / "bare"
    bare.mkdir()
    shutil.copy(folder / "model.safetensors", bare / "model.safetensors")
    shutil.copy(folder / text.SPIECE_FILE, bare / text.SPIECE_FILE)
    with pytest.raises(FileNotFoundError, match="config"):
        t5.import_weights(bare)
    config, _ = t5.import_weights(bare, base)
    assert config.model.to_dict() == base.model.to_dict()


def test_flan_t5_xl_config():
    config = t5.config_from_file(REPO_ROOT / "configs" / "flan_t5_xl.py")
    m = config.model
    assert (config.kind, config.text_max_len) == ("t5", 512)
    assert (m.d_model, m.d_kv, m.num_heads, m.d_ff, m.num_layers, m.vocab_size) == (2048, 64, 32, 5120, 24, 32128)
    assert (m.relative_attention_num_buckets, m.relative_attention_max_distance, m.feed_forward_proj) == \
        (32, 128, "gated-gelu")
    assert len(t5.expected_shapes(m)) == 3 + 9 * 24
    with pytest.raises(ValueError, match="gated-gelu"):
        t5.model_config_from_hf(dict(t5.hf_config_json(m), feed_forward_proj="relu"), "v1.0 config")


def test_export_of_a_model_built_here(tmp_path):
    """A model initialised here (not imported) exports to the HF layout and reads back identically."""
    cfg = text.default_model_config(vocab_size=40, d_model=32, d_kv=8, num_heads=2, d_ff=48, num_layers=3)
    params = param_dict(text.T5Encoder(cfg, rngs=nnx.Rngs(1)))
    proto = toy_text_encoder.train_spiece(["make the red circle blue", "move it left"], 40, 0)
    config = text.encoder_config(cfg, 16, proto)
    out = t5.save_hf_folder(tmp_path / "hf", config, params)
    again, back = t5.import_weights(out)
    assert again.model.to_dict() == cfg.to_dict()
    want, got = _flat(params), _flat(back)
    assert sorted(want) == sorted(got)
    for k in want:
        np.testing.assert_array_equal(np.asarray(want[k]), got[k], err_msg=k)
