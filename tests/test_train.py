"""The trainer (varedit_jax/train.py) on a small VAREdit model and the toy assets (built once into a temporary cache):
sharded vs single-device steps, non-finite steps, init from a checkpoint, resume after kill -9, SIGTERM, two
processes with jax.distributed, the CLI."""
import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import time

import jax

import numpy as np
import pytest

from helpers import REPO_ROOT, data_digests, final_params, small_config, small_flags, train_subprocess
from varedit_jax import (assets, checkpoint, configlib, data, loading, optim, state_dicts, train, train_config,
                         transformer)
from varedit_jax import params as params_lib
from varedit_jax import trainer as trainer_lib
from varedit_jax.convert import infinity as convert_infinity

@pytest.fixture(scope="module")
def cache():
    """The session's asset cache (tests/conftest.py)."""
    return pathlib.Path(os.environ["VAREDIT_CACHE"])


@pytest.fixture(scope="module")
def parts(cache):
    """(resolved config, image tokenizer, text encoder, text tokenizer, one host batch)."""
    config = assets.resolve(small_config())
    vae, encoder, text_tok = loading.load_frozen(config)
    config.data.stride = vae.stride
    ds = data.make_dataset(config.data, seed=0, batch_size=config.batch_size,
                           tokenizer=lambda t, n: text_tok(list(t), n))
    host, _ = train.host_batch(next(iter(ds)), None)
    return config, vae, encoder, text_tok, host


def _run_step(config, mesh, vae, encoder, params, host, template="1.0"):
    trainer = trainer_lib.Trainer(config, mesh, vae, encoder)
    state = trainer.init_state(params)
    trainer.check_sharding(state)
    frozen = trainer.place_frozen(vae, encoder)
    batch = data.global_batch(host, trainer.batch_sharding)
    with jax.set_mesh(mesh):
        state, out = trainer.step_fn(template)(state, frozen, batch)
    return trainer, state, jax.device_get(out)


def test_sharded_step_equals_the_single_device_step(parts):
    """On 2 simulated slices x (fsdp 2, tensor 2): the batch splits over dcn and fsdp, parameters over fsdp / tensor
    within each slice (a full copy per slice), and the step equals the one-device step."""
    config, vae, encoder, _, host = parts
    config.mesh.shape = (1, 1, 1)
    params = transformer.param_dict(transformer.build(config.model, seed=0))
    _, one, out1 = _run_step(config, trainer_lib.make_mesh(config, jax.devices()[:1]), vae, encoder, params, host)
    config.mesh.slices, config.mesh.shape = 2, (1, 2, 2)
    mesh = trainer_lib.make_mesh(config)
    assert dict(mesh.shape) == {"dcn": 2, "data": 1, "fsdp": 2, "tensor": 2}
    trainer, eight, out8 = _run_step(config, mesh, vae, encoder, params, host)
    config.mesh.slices = 1
    specs = [s.spec for s in jax.tree.leaves(trainer.param_shardings)]
    assert any("fsdp" in str(s) for s in specs) and any("tensor" in str(s) for s in specs)
    assert not any("dcn" in str(s) for s in specs) and trainer.batch_sharding.spec[0] == ("dcn", "data", "fsdp")
    np.testing.assert_allclose(out8["loss"], out1["loss"], rtol=1e-5)
    np.testing.assert_allclose(out8["grad_norm"], out1["grad_norm"], rtol=1e-4)
    for a, b in zip(jax.tree.leaves(jax.device_get(eight.params)), jax.tree.leaves(jax.device_get(one.params))):
        np.testing.assert_allclose(a, b, atol=2e-6)
    assert out1["finite"] and int(one.step) == 1


def test_a_nonfinite_batch_is_skipped_and_counted(parts):
    config, vae, encoder, _, host = parts
    config.mesh.shape = (-1, 1, 1)
    params = transformer.param_dict(transformer.build(config.model, seed=0))
    bad = dict(host, source=np.full_like(host["source"], np.nan))
    trainer, state, out = _run_step(config, trainer_lib.make_mesh(config), vae, encoder, params, bad)
    assert not out["finite"] and int(state.skipped) == 1 and int(state.bad_steps) == 1
    for a, b in zip(jax.tree.leaves(jax.device_get(state.params)), jax.tree.leaves(params)):
        np.testing.assert_array_equal(a, np.asarray(b))
    frozen = trainer.place_frozen(vae, encoder)
    with jax.set_mesh(trainer.mesh):
        state, out = trainer.step_fn("1.0")(state, frozen, data.global_batch(host, trainer.batch_sharding))
    assert out["finite"] and int(state.skipped) == 1 and int(state.bad_steps) == 0 and int(state.step) == 2


@pytest.mark.slow
def test_too_many_nonfinite_steps_stop_the_run_after_saving(cache, tmp_path, monkeypatch):
    """lr 1e39 (refused by validation, forced through here): loss and gradients stay finite but the update makes the
    parameters inf, so the parameter guard skips every step; two in a row stop the run with the last finite ones."""
    monkeypatch.setattr(optim, "validate", lambda cfg: None)
    config = small_config(total_steps=10, max_nonfinite_steps=2, checkpoint_every=100, **{"optim.lr": 1e39})
    with pytest.raises(FloatingPointError, match="non-finite steps in a row"):
        train.train(config, tmp_path)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if r["split"] == "train"]
    assert [r["skipped"] for r in train_rows] == [1, 2]
    assert all(np.isfinite(r["loss"]) and np.isfinite(r["grad_norm"]) for r in train_rows)
    assert checkpoint.resolve(tmp_path)[1] == 2
    params = checkpoint.load_params(tmp_path)[1]
    assert all(np.isfinite(np.asarray(p)).all() for p in jax.tree.leaves(params))


@pytest.mark.parametrize("form", ["checkpoint", "official safetensors"])
def test_init_checkpoint_keeps_matching_tensors_and_drops_the_others(parts, tmp_path, capsys, form):
    """Matching tensors are read straight into the run's shardings (a checkpoint array by array, official weights
    tensor by tensor); the random init itself is the one `transformer.build` makes, created sharded."""
    config, vae, encoder, *_ = parts
    config = configlib.override(config, {"mesh.shape": (1, -1, 1)})  # fsdp over all 8 devices
    other = configlib.override(config, {"model.bits": 8})
    tree = transformer.param_dict(transformer.build(other.model, seed=5))
    if form == "checkpoint":
        checkpoint.save_params(tmp_path / "init", tree, other)
        path = tmp_path / "init"
    else:
        path = tmp_path / "init.safetensors"
        state_dicts.write_state_dict(path, convert_infinity.export_weights(other, tree))
    source = params_lib.flat_leaves(tree)
    trainer = trainer_lib.Trainer(config, trainer_lib.make_mesh(config), vae, encoder)
    init = params_lib.flat_leaves(trainer.init_params_fn()())
    built = params_lib.flat_leaves(transformer.param_dict(transformer.build(config.model, seed=config.seed)))
    loaded = params_lib.flat_leaves(loading.load_init_params(configlib.override(config, {"init_checkpoint": str(path)}),
                                                             params_lib.replace_leaves(built, init)))
    for name, array in loaded.items():
        np.testing.assert_array_equal(init[name], built[name])
        want = built[name] if name in ("word_embed/kernel", "head/kernel", "head/bias") else source[name]
        np.testing.assert_array_equal(array, want, err_msg=name)
        assert array.sharding == init[name].sharding, name
    assert init["blocks/ffn/fc1/kernel"].sharding.spec[1] == "fsdp"
    assert "kept at init (shape mismatch / missing): ['head/bias', 'head/kernel', 'word_embed/kernel']" in \
        capsys.readouterr().out


@pytest.mark.slow
def test_kill_9_and_resume_equals_a_straight_run(trained_run, tmp_path):
    """Killed (SIGKILL) after its step-2 checkpoint and resumed, a run ends where the session's straight run (the
    same config, 4 steps, `trained_run`) ended: the same parameters and each step's batch read once, in order."""
    straight, _ = trained_run
    flags = small_flags(total_steps=4, checkpoint_every=2)
    killed = train_subprocess([f"--workdir={tmp_path / 'b'}", *flags])
    marker = tmp_path / "b" / "checkpoints" / "2" / "commit_success.txt"
    deadline = time.time() + 600
    while not marker.exists() and killed.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    killed.send_signal(signal.SIGKILL)
    killed.wait(60)
    assert killed.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    first = data_digests(tmp_path / "b")
    resumed = train_subprocess([f"--workdir={tmp_path / 'b'}", *flags])
    out = resumed.communicate(timeout=600)[0]
    assert resumed.returncode == 0 and "resumed" in out, out
    for a, b in zip(final_params(straight), final_params(tmp_path / "b"), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-6)
    straight_digests, resumed_digests = data_digests(straight), data_digests(tmp_path / "b")
    assert first and all(straight_digests[s] == d for s, d in resumed_digests.items())
    assert sorted(resumed_digests) == list(range(1, 5))


@pytest.mark.slow
def test_sigterm_saves_a_checkpoint_and_returns(cache, tmp_path):
    proc = train_subprocess([f"--workdir={tmp_path}", *small_flags(total_steps=500, checkpoint_every=1000)])
    metrics = tmp_path / "metrics.jsonl"
    deadline = time.time() + 600
    while (not metrics.exists() or len(metrics.read_text().splitlines()) < 2) and time.time() < deadline:
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    out = proc.communicate(timeout=300)[0]
    assert proc.returncode == 0 and "preempted" in out, out
    step = checkpoint.resolve(tmp_path)[1]
    assert 2 <= step < 500 and max(data_digests(tmp_path)) == step


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_with_jax_distributed_agree_with_one(cache, tmp_path):
    flags = small_flags(total_steps=2, checkpoint_every=2, sample_every=0, sample_count=2,
                   **{"text.drop_rate": 0.0, "bsc.noise_apply_layers": 0})
    single = train_subprocess([f"--workdir={tmp_path / 'one'}", *flags])
    assert single.wait(600) == 0, single.stdout.read()
    port = _free_port()
    env = {"XLA_FLAGS": os.environ["XLA_FLAGS"].replace("device_count=8", "device_count=4")}
    procs = [train_subprocess([f"--workdir={tmp_path / 'two'}", *flags, f"--coordinator=127.0.0.1:{port}",
                          "--num_processes=2", f"--process_id={i}"], env) for i in range(2)]
    outs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    rows = {}
    for name in ("one", "two"):
        lines = (tmp_path / name / "metrics.jsonl").read_text().splitlines()
        rows[name] = [json.loads(line) for line in lines if '"train"' in line]
    assert len(rows["two"]) == 2  # only process 0 writes metrics
    assert (tmp_path / "two" / "samples" / "step_2.png").is_file()  # the sampler over both processes' devices
    np.testing.assert_allclose(rows["two"][0]["loss"], rows["one"][0]["loss"], rtol=1e-5)
    np.testing.assert_allclose(rows["two"][1]["loss"], rows["one"][1]["loss"], rtol=1e-3)


def test_cli_errors_exit_2(cache, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "varedit_jax.train", f"--workdir={tmp_path}"], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=120, env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert proc.returncode == 2 and "--config" in proc.stderr
    proc = train_subprocess([f"--workdir={tmp_path}", "--config.conditioning=everything"])
    out = proc.communicate(timeout=300)[0]
    assert proc.returncode == 2 and "conditioning" in out


def test_validate_refuses_inconsistent_configs():
    config = small_config()
    for field, value in (("batch_size", 6), ("conditioning", "none"), ("checkpoint_every", 0), ("toy_eval_pairs", -1)):
        bad = configlib.override(config, {field: value, "grad_accum": 4} if field == "batch_size" else {field: value})
        with pytest.raises(ValueError):
            train_config.validate(bad)


def test_a_finished_run_writes_toy_scores_and_learning_curves(trained_run):
    """The end of a run: toy scores of the trained model beside copy-source (preservation 10 by definition) and
    the oracle, and a curves PNG with a line per metric (the run's colour inside each panel)."""
    from PIL import Image
    workdir, summary = trained_run
    rows = {r["conditioning"]: r for r in json.loads((workdir / "toy_scores.json").read_text())["rows"]}
    assert set(rows) == {"sar (this run)", "copy_source", "oracle"} and rows["sar (this run)"]["n"] == 4
    assert rows["copy_source"]["preservation"] == 10 and rows["copy_source"]["success"] < rows["oracle"]["success"]
    assert all(0 <= r[k] <= 10 for r in rows.values() for k in ("success", "preservation", "balance"))
    png = np.asarray(Image.open(workdir / "curves.png").convert("RGB"))
    line = np.all(png == (31, 119, 180), axis=-1)  # the first run's colour
    half = png.shape[1] // 2
    assert line[:, :half].sum() > 20 and line[:, half:].sum() > 20  # loss and bit-accuracy panels both drawn


@pytest.mark.slow
def test_grad_accumulation_matches_the_full_batch(parts):
    config, vae, encoder, _, host = parts
    config = configlib.override(config, {"text.drop_rate": 0.0, "bsc.noise_apply_layers": 0})
    config.mesh.shape = (-1, 1, 1)
    params = transformer.param_dict(transformer.build(config.model, seed=0))
    mesh = trainer_lib.make_mesh(config)
    _, full, out = _run_step(config, mesh, vae, encoder, params, host)
    _, accum, out2 = _run_step(configlib.override(config, {"grad_accum": 2}), mesh, vae, encoder, params, host)
    np.testing.assert_allclose(out2["loss"], out["loss"], rtol=1e-5)
    np.testing.assert_allclose(out2["grad_norm"], out["grad_norm"], rtol=1e-4)
    for a, b in zip(jax.tree.leaves(jax.device_get(accum.params)), jax.tree.leaves(jax.device_get(full.params))):
        np.testing.assert_allclose(a, b, atol=2e-6)

