"""The export bundle (`convert export` -> weights + model.json, `convert/bundle.py`): the official constructor's
arguments of the fixture weights, `convert import --config model.json`, `.pth` against safetensors, EMA export and
`checkpoint.load_params(weights="ema")`, the tokenizer's weights, file modes, and the refusals of what the official
code cannot serve (and training's warning about them)."""
import json
import stat

import grain
import jax
import numpy as np
import pytest
import safetensors.numpy

from helpers import fixtures_root, small_config
from transformer_cases import KIND_OF_FOLDER, folder_config
from varedit_jax import checkpoint, loading, schedules, train, transformer
from varedit_jax.convert import bundle, infinity
from varedit_jax.convert.__main__ import main as cli

# Fields that are compute / initialisation settings, not part of what a model computes.
COMPUTE_FIELDS = ("dtype", "attention_impl", "remat", "scan_layers", "init_std", "aln_init", "aln_gamma_init",
                  "head_init_scale")


def _fixture_folders():
    return [pytest.param(name, kind, id=name, marks=[] if (fixtures_root() / name / "weights.safetensors").is_file()
                         else pytest.mark.skip(reason=f"no {name} fixture weights")) for name, kind in
            KIND_OF_FOLDER.items()]


def _mode(path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _model_fields(config) -> dict:
    return {k: v for k, v in infinity.model_config(config).to_dict().items() if k not in COMPUTE_FIELDS}


def _export(tmp_path, ckpt, name="model.safetensors", *flags) -> tuple[int, dict | None]:
    out = tmp_path / name
    code = cli(["export", "--checkpoint", str(ckpt), "--out", str(out), *flags])
    path = out.parent / bundle.FILE
    return code, json.loads(path.read_text()) if code == 0 and path.is_file() else None


@pytest.mark.parity
@pytest.mark.parametrize("name,kind", _fixture_folders())
def test_fixture_weights_export_the_fixture_constructor_kwargs(name, kind, tmp_path):
    folder = fixtures_root() / name
    fixture = folder_config(folder)
    assert cli(["import", "--kind", kind, "--src", str(folder / "weights.safetensors"), "--out",
                str(tmp_path / "ckpt"), "--config", str(folder / "config.json")]) == 0
    code, meta = _export(tmp_path / "out", tmp_path / "ckpt")
    assert code == 0
    want = {k: v for k, v in fixture["constructor_kwargs"].items() if k not in bundle.CALLER_SUPPLIED}
    if want.get("pn") not in schedules.RESOLUTION_TO_PN.values():  # a placeholder ("pn of the case"): unknown here
        want["pn"] = None
    assert meta["constructor_kwargs"] == want
    assert meta["model_type"] is None and meta["weights"]["which"] == "params" and meta["weights"]["step"] == 0
    bits = checkpoint.load_config(tmp_path / "ckpt").model.bits
    assert meta["image_tokenizer"] == {"vae_type": bits // 4 if want["apply_spatial_patchify"] else bits,
                                       "apply_spatial_patchify": want["apply_spatial_patchify"], "path": None}
    out = tmp_path / "out" / "model.safetensors"
    assert _mode(out) == _mode(tmp_path / "out" / bundle.FILE) == 0o644
    # import --config model.json rebuilds the same config; exporting it again gives the same file
    assert cli(["import", "--kind", kind, "--src", str(out), "--out", str(tmp_path / "again"), "--config",
                str(tmp_path / "out" / bundle.FILE)]) == 0
    original, rebuilt = checkpoint.load_config(tmp_path / "ckpt"), checkpoint.load_config(tmp_path / "again")
    assert (rebuilt.kind, rebuilt.conditioning, rebuilt.get("pn")) == (original.kind, original.conditioning,
                                                                      original.get("pn"))
    assert _model_fields(rebuilt) == _model_fields(original)
    code, again = _export(tmp_path / "out2", tmp_path / "again")
    assert code == 0 and again["constructor_kwargs"] == meta["constructor_kwargs"]
    first, second = (safetensors.numpy.load_file(p / "model.safetensors") for p in (tmp_path / "out",
                                                                                   tmp_path / "out2"))
    assert sorted(first) == sorted(second) and all(np.array_equal(first[k], second[k]) for k in first)


def test_trained_run_bundle_pth_tokenizer_and_rebuild(trained_run, tmp_path, capsys):
    torch = pytest.importorskip("torch", reason=".pth export needs the torch extra")
    workdir, summary = trained_run
    config = checkpoint.load_config(workdir)
    code, meta = _export(tmp_path / "st", workdir, "model.safetensors", "--with-tokenizer")
    assert code == 0, capsys.readouterr().err
    kwargs = meta["constructor_kwargs"]
    assert set(kwargs) == set(bundle.constructor_kwargs(config)) and not set(kwargs) & set(bundle.CALLER_SUPPLIED)
    m = config.model
    assert (kwargs["text_channels"], kwargs["embed_dim"], kwargs["depth"], kwargs["num_heads"]) == (
        m.text_dim, m.embed_dim, m.depth, m.num_heads)
    assert kwargs["text_maxlen"] == 512 and meta["text_max_len"] == m.text_max_len == 32  # cfg_uncond padded
    assert kwargs["mlp_ratio"] * m.embed_dim == m.mlp_dim and kwargs["pn"] == config.pn
    assert (meta["kind"], meta["conditioning"], meta["weights"]) == (
        "varedit", "sar", {"file": "model.safetensors", "which": "params", "dtype": "fp32", "step": summary["step"]})
    tok = meta["image_tokenizer"]
    assert tok["vae_type"] == m.bits and tok["apply_spatial_patchify"] == 0 and tok["file"] == "image_tokenizer.safetensors"
    tok_sd = safetensors.numpy.load_file(tmp_path / "st" / tok["file"])
    assert tok_sd["encoder.conv_out.conv.weight"].shape[0] == tok["config"]["codebook_dim"] == m.bits
    assert _mode(tmp_path / "st" / tok["file"]) == 0o644
    assert meta["text_encoder"]["width"] == m.text_dim and meta["text_encoder"]["path"] == config.text.path
    # .pth: the same tensors (and bf16) under torch.load(weights_only=True)
    for dtype in ("fp32", "bf16"):
        assert _export(tmp_path / dtype, workdir, "model.pth", "--dtype", dtype)[0] == 0
        assert _export(tmp_path / dtype, workdir, "model.safetensors", "--dtype", dtype)[0] == 0
        loaded = torch.load(tmp_path / dtype / "model.pth", weights_only=True)
        want = safetensors.numpy.load_file(tmp_path / dtype / "model.safetensors")
        assert sorted(loaded) == sorted(want) and _mode(tmp_path / dtype / "model.pth") == 0o644
        for k, v in want.items():
            got = loaded[k].float().numpy() if dtype == "bf16" else loaded[k].numpy()
            assert loaded[k].dtype == (torch.bfloat16 if dtype == "bf16" else torch.float32)
            np.testing.assert_array_equal(got, v.astype(np.float32), err_msg=k)
    # import --config model.json rebuilds the trained config's model
    assert cli(["import", "--kind", "varedit", "--src", str(tmp_path / "st" / "model.safetensors"), "--out",
                str(tmp_path / "again"), "--config", str(tmp_path / "st" / bundle.FILE)]) == 0
    rebuilt = checkpoint.load_config(tmp_path / "again")
    assert (rebuilt.conditioning, rebuilt.pn) == ("sar", config.pn) and _model_fields(rebuilt) == _model_fields(config)


def _ema_checkpoint(trained_run, root):
    """A training-layout step (params, train_state with an EMA, data, config) from the trained run's params."""
    config, params = checkpoint.load_params(trained_run[0])
    ema = jax.tree.map(lambda x: x * 0.5, params)
    train_state = {"opt_state": {"count": np.int32(1)}, "ema": ema, "bad_steps": np.int32(0),
                   "skipped": np.int32(0)}
    saver = checkpoint.TrainCheckpoints(root, keep=1)
    saver.save(7, params, train_state, iter(grain.MapDataset.range(4).to_iter_dataset()), config, wait=True)
    saver.close()
    return config, params, ema


def test_ema_is_read_loaded_and_exported_by_default(trained_run, tmp_path, capsys):
    config, params, ema = _ema_checkpoint(trained_run, tmp_path / "run")
    same = lambda a, b: all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))  # noqa
    assert same(checkpoint.load_params(tmp_path / "run", weights="ema")[1], ema)
    assert same(checkpoint.load_params(tmp_path / "run")[1], params)
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
    step, _, restored = checkpoint.load(tmp_path / "run", abstract, weights="ema")
    assert step == 7 and same(restored, ema)
    with pytest.raises(checkpoint.StoredShapeMismatch):
        checkpoint.load_params(tmp_path / "run", {"cfg_uncond": abstract["cfg_uncond"]}, weights="ema")
    _, model = loading.load_transformer(tmp_path / "run", weights="ema")
    assert same(transformer.param_dict(model), ema)
    code, meta = _export(tmp_path / "default", tmp_path / "run")
    assert code == 0 and meta["weights"]["which"] == "ema" and meta["weights"]["step"] == 7
    exported = safetensors.numpy.load_file(tmp_path / "default" / "model.safetensors")
    want = infinity.export_weights(config, ema)
    assert all(np.array_equal(exported[k], want[k]) for k in want)
    code, meta = _export(tmp_path / "params", tmp_path / "run", "model.safetensors", "--weights", "params")
    assert code == 0 and meta["weights"]["which"] == "params"
    np.testing.assert_array_equal(safetensors.numpy.load_file(tmp_path / "params" / "model.safetensors")["head.bias"],
                                  infinity.export_weights(config, params)["head.bias"])
    # a run without EMA: params by default, a clear refusal when EMA is asked for
    with pytest.raises(checkpoint.NoEMA, match="ema_decay"):
        checkpoint.load_params(trained_run[0], weights="ema")
    assert _export(tmp_path / "none", trained_run[0], "model.safetensors", "--weights", "ema")[0] == 2
    assert "no EMA" in capsys.readouterr().err and not (tmp_path / "none").exists()
    with pytest.raises(ValueError, match="weights must be one of"):
        checkpoint.load_params(tmp_path / "run", weights="best")


def _unservable(trained_run, root, **changes):
    """A checkpoint of the trained run's model with config `changes` (conditioning, or a text width with its own
    random params)."""
    config, params = checkpoint.load_params(trained_run[0])
    for key, value in changes.items():
        if key == "conditioning":
            config.conditioning = value
        else:
            config.model[key] = value
    if "text_dim" in changes:
        model_cfg = transformer.default_model_config(**dict(config.model.items()))
        config.model.text_pool_heads = model_cfg.text_pool_heads = 1
        params = transformer.param_dict(transformer.build(model_cfg, seed=0))
    return checkpoint.save_params(root, params, config)


@pytest.mark.parametrize("changes,match", [({"conditioning": "finest"}, "SAR editing only"),
                                           ({"conditioning": "full"}, "SAR editing only"),
                                           ({"text_dim": 64}, "0 attentive-pooling heads")])
def test_export_refuses_what_the_official_code_cannot_serve(trained_run, tmp_path, capsys, changes, match):
    ckpt = _unservable(trained_run, tmp_path / "ckpt", **changes)
    assert _export(tmp_path / "out", ckpt)[0] == 2
    err = capsys.readouterr().err
    assert match in err and "--force" in err and not (tmp_path / "out").exists()
    code, meta = _export(tmp_path / "forced", ckpt, "model.safetensors", "--force")
    assert code == 0 and (tmp_path / "forced" / "model.safetensors").is_file()


def test_serving_problems_name_each_official_rule(trained_run):
    config = checkpoint.load_config(trained_run[0])
    assert bundle.serving_problems(config) == []
    for field, value, match in (("text_pool_heads", 2, "derives 1"), ("mlp_dim", 200, "multiple of 256"),
                                ("num_levels", 13, "15 level embeddings")):
        changed = checkpoint.load_config(trained_run[0])
        changed.model[field] = value
        assert len(problems := bundle.serving_problems(changed)) == 1 and match in problems[0]
    big = transformer.default_model_config(**transformer.OFFICIAL_SHAPES["8b"])
    assert bundle.model_type(big) == "infinity_8b" and bundle.model_type(infinity.model_config(config)) is None


def test_training_warns_at_start_about_an_unservable_model(tmp_path, capfd):
    train.train(small_config(total_steps=0, conditioning="finest"), tmp_path / "run")
    err = capfd.readouterr().err
    assert "conditioning 'finest'" in err and "`convert export` will refuse" in err
