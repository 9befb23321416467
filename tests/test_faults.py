"""Faults and bad input (issue 14's table, one test per row): each reproduces what a hostile user did and asserts the
clear error, the counted skip, or the recovery that replaced the old behaviour."""
import json
import logging
import os
import pathlib
import shutil
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
import safetensors.numpy
from array_record.python.array_record_module import ArrayRecordReader, ArrayRecordWriter

from helpers import REPO_ROOT, fixture_dir, small_config
from varedit_jax import assets, checkpoint, configlib, editor, loading, optim, run_lock, train
from varedit_jax.convert.__main__ import main as convert
from data_pipelines import describe, records


# ------------------------------------------------------------------------------------------------ converter
def test_import_into_a_non_empty_out_is_refused_unless_overwrite(tmp_path, capsys):
    out = tmp_path / "ckpt"
    varedit = fixture_dir("varedit_transformer") / "weights.safetensors"
    infinity = fixture_dir("infinity_transformer") / "weights.safetensors"
    assert convert(["import", "--kind", "varedit", "--src", str(varedit), "--out", str(out)]) == 0
    for kind, src in (("varedit", varedit), ("infinity", infinity)):  # the same or another kind
        assert convert(["import", "--kind", kind, "--src", str(src), "--out", str(out)]) == 2
        assert "not empty" in capsys.readouterr().err and checkpoint.load_config(out).kind == "varedit"
    assert convert(["import", "--kind", "infinity", "--src", str(infinity), "--out", str(out), "--overwrite"]) == 0
    assert checkpoint.load_config(out).kind == "infinity" and checkpoint.resolve(out)[1] == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # no temporaries left beside it


def test_import_refuses_nan_and_integer_tensors(tmp_path, capsys):
    sd = dict(safetensors.numpy.load_file(fixture_dir("varedit_transformer") / "weights.safetensors"))
    sd["head.weight"] = sd["head.weight"].copy()
    sd["head.weight"][0, 0] = np.nan
    sd["word_embed.weight"] = sd["word_embed.weight"].astype(np.int32)
    safetensors.numpy.save_file(sd, tmp_path / "bad.safetensors")
    assert convert(["import", "--kind", "varedit", "--src", str(tmp_path / "bad.safetensors"),
                    "--out", str(tmp_path / "never")]) == 2
    err = capsys.readouterr().err
    assert "head.weight" in err and "NaN" in err and "word_embed.weight (int32)" in err
    assert not (tmp_path / "never").exists()


# ------------------------------------------------------------------------------------------------ the workdir lock
def test_a_second_run_on_a_locked_workdir_is_refused(tmp_path, capsys):
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        lock = {"host": socket.gethostname(), "pid": holder.pid, "boot_id": run_lock._boot_id(),
                "started": time.time(), "refreshed": time.time()}
        (tmp_path / "run.lock").write_text(json.dumps(lock))
        assert train.main(["train"], small_config(total_steps=1), str(tmp_path)) == 2
        err = capsys.readouterr().err
        assert f"pid {holder.pid}" in err and "in use" in err and len(err.strip().splitlines()) == 1
        assert not (tmp_path / "checkpoints").exists()  # refused before anything was written
    finally:
        holder.kill()
        holder.wait()


def test_stale_locks_are_taken_over_and_released(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    here = {"host": socket.gethostname(), "boot_id": run_lock._boot_id(), "started": time.time()}
    cases = {"dead pid on this host (a kill -9)": {**here, "pid": dead.pid, "refreshed": time.time()},
             "no refresh for too long (another host)": {**here, "host": "elsewhere", "pid": 1,
                                                        "refreshed": time.time() - run_lock.STALE_S - 1}}
    for holder in cases.values():
        (tmp_path / "run.lock").write_text(json.dumps(holder))
        with run_lock.RunLock(tmp_path):
            mine = json.loads((tmp_path / "run.lock").read_text())
            assert mine["pid"] == os.getpid() and mine["replaced"]["pid"] == holder["pid"]
        assert not (tmp_path / "run.lock").exists()
    (tmp_path / "run.lock").write_text(json.dumps({**here, "host": "elsewhere", "pid": 1, "refreshed": time.time()}))
    with pytest.raises(run_lock.WorkdirLocked, match="elsewhere"):
        run_lock.RunLock(tmp_path).acquire()  # a fresh lock of another host is live


# ------------------------------------------------------------------------------------------------ bad data
def _dataset_with_bad_records(src, dst, n_bad: int):
    """A copy of record dataset `src` whose first `n_bad` records are garbage bytes."""
    shutil.copytree(src, dst)
    shard = dst / json.loads((dst / "dataset.json").read_text())["shards"][0]["file"]
    reader = ArrayRecordReader(str(shard))
    rows = [reader.read([i])[0] for i in range(reader.num_records())]
    reader.close()
    writer = ArrayRecordWriter(str(shard), records.WRITER_OPTIONS)
    for i, row in enumerate(rows):
        writer.write(b"not a record" if i < n_bad else row)
    writer.close()
    return dst


def test_bad_records_are_counted_and_too_many_stop_the_run(tmp_path, capsys):
    data_dir = _toy_data()
    some = _dataset_with_bad_records(data_dir, tmp_path / "some_bad", 6)
    summary = train.train(small_config(total_steps=2, checkpoint_every=2, **{
        "data.paths": (str(some),), "data.max_bad_fraction": 0.5}), tmp_path / "some")
    rows = [json.loads(line) for line in (tmp_path / "some" / "metrics.jsonl").read_text().splitlines()]
    logged = sum(r["data/replaced"] for r in rows if r["split"] == "train")
    assert logged == sum(summary["data_replaced"].values()) == summary["data_replaced"]["decode"] > 0
    assert summary["records_read"] == 16 + logged

    most = _dataset_with_bad_records(data_dir, tmp_path / "most_bad", 46)  # 46 of 48, like 62 of 64
    assert train.main(["train"], small_config(total_steps=4, **{"data.paths": (str(most),)}),
                      str(tmp_path / "most")) == 1
    err = capsys.readouterr().err
    assert "failed to load" in err and "max_bad_fraction" in err
    assert checkpoint.resolve(tmp_path / "most")[1] == 1  # saved before stopping
    assert err.count("failed to load (decode") <= 10  # the first replacements logged, the rest counted


def _toy_data() -> pathlib.Path:
    """The session's toy training set (built once, in the session asset cache)."""
    return pathlib.Path(assets.resolve(small_config()).data.paths[0])


@pytest.mark.parametrize("damage", ["truncated", "empty", "missing", "damaged footer"])
def test_an_unreadable_shard_is_named_in_one_line(damage, tmp_path, capsys):
    dst = shutil.copytree(_toy_data(), tmp_path / "ds")
    shard = dst / json.loads((dst / "dataset.json").read_text())["shards"][0]["file"]
    size = shard.stat().st_size
    if damage == "truncated":
        os.truncate(shard, size // 2)
    elif damage == "empty":
        os.truncate(shard, 0)
    elif damage == "missing":
        shard.unlink()
    else:
        with open(shard, "r+b") as f:
            f.seek(size - 70000)
            f.write(os.urandom(70000))
    assert describe.main([str(dst)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(shard) in err and "unreadable record shard" in err
    if damage == "truncated":  # the trainer reads shards the same way
        assert train.main(["train"], small_config(total_steps=1, **{"data.paths": (str(dst),)}),
                          str(tmp_path / "run")) == 2
        assert str(shard) in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------ checkpoints
def _damage(step_dir, how: str) -> None:
    if how == "arrays":
        for f in (step_dir / "params").rglob("d/*"):
            f.unlink()
    else:
        (step_dir / "params" / "_METADATA").unlink()


def test_a_damaged_newest_step_is_moved_aside_and_the_run_resumes_from_the_previous(trained_run, tmp_path, capsys):
    workdir = shutil.copytree(trained_run[0], tmp_path / "run")
    _damage(workdir / "checkpoints" / "4", "arrays")
    summary = train.train(small_config(total_steps=6, checkpoint_every=2), workdir)
    err = capsys.readouterr().err
    assert "step 4" in err and "damaged" in err and "checkpoints_corrupt" in err
    assert (workdir / "checkpoints_corrupt" / "4" / "params").is_dir()
    assert summary["step"] == 6 and checkpoint.resolve(workdir)[1] == 6  # later saves are not swallowed
    steps = [r["step"] for r in map(json.loads, (workdir / "metrics.jsonl").read_text().splitlines())
             if r["split"] == "train"]
    assert steps == [1, 2, 3, 4, 5, 6]  # the resumed run's re-logged steps 3, 4 appear once


@pytest.mark.parametrize("how", ["arrays", "metadata"])
def test_readers_use_the_previous_step_and_say_which_is_broken(how, trained_run, tmp_path, capsys):
    workdir = shutil.copytree(trained_run[0], tmp_path / "run")
    _damage(workdir / "checkpoints" / "4", how)
    out = tmp_path / "model.safetensors"
    assert convert(["export", "--checkpoint", str(workdir), "--out", str(out)]) == 0
    err = capsys.readouterr().err
    assert "checkpoint step 4" in err and "using step 2" in err and out.is_file()
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    config, model = loading.load_transformer(workdir)  # what `edit` and `ablate` load through (Editor)
    assert model.cfg.embed_dim == config.model.embed_dim and "using step 2" in capsys.readouterr().err
    assert convert(["export", "--checkpoint", str(workdir / "checkpoints" / "4"), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "step 4" in err and "damaged" in err and "Traceback" not in err


def test_a_changed_model_config_is_a_mismatch_not_damage(trained_run, tmp_path):
    workdir = shutil.copytree(trained_run[0], tmp_path / "run")
    with pytest.raises(ValueError, match="another config"):
        train.train(small_config(total_steps=6, checkpoint_every=2, **{"model.depth": 3}), workdir)
    assert not (workdir / "checkpoints_corrupt").exists() and checkpoint.resolve(workdir)[1] == 4


# ------------------------------------------------------------------------------------------------ parameters, config
@pytest.mark.parametrize("field,value", [("lr", 1e39), ("lr", float("inf")), ("lr", 0.0), ("b1", 1.0),
                                         ("b2", -0.1), ("eps", 0.0), ("clip", 0.0), ("eps", float("nan"))])
def test_optimizer_values_outside_their_range_are_refused(field, value):
    """(The parameter guard against an overflowing update: test_train's non-finite stop test, lr 1e39.)"""
    with pytest.raises(ValueError, match=field):
        optim.validate(configlib.override(small_config(), {f"optim.{field}": value}).optim)


def test_an_unknown_config_field_is_one_line_with_the_closest_names(tmp_path):
    with pytest.raises(KeyError, match="closest: optim.lr"):
        configlib.override(small_config(), {"optim.lrr": 1})
    for flag, expect in (("--config.bogus=1", "no field 'bogus'"), ("--config.optim.lrr=1", "closest: optim.lr")):
        proc = subprocess.run([sys.executable, "-m", "varedit_jax.train", "--config", "configs/varedit_tiny.py",
                               f"--workdir={tmp_path}", flag], cwd=REPO_ROOT, capture_output=True, text=True,
                              timeout=300)
        assert proc.returncode == 2 and expect in proc.stderr, proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr


# ------------------------------------------------------------------------------------------------ odd images, launcher
def test_odd_images_are_warned_about_once_each(caplog):
    size = (64, 64)
    with caplog.at_level(logging.WARNING, logger="varedit_jax.editor"):
        for shape in ((1, 1), (100, 4000), (64, 64), (60, 70)):
            for preprocess in editor.PREPROCESS:
                out = editor.preprocess_image(np.zeros((*shape, 3), np.uint8), size, preprocess)
                assert out.shape == (*size, 3)
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 2 * len(editor.PREPROCESS)  # 1x1 and 4000x100 only, once per call
    assert any("1x1 input resized to 64x64: upscaled 64.0x" in m for m in messages)
    assert any("4000x100" in m and "padding" in m for m in messages)
    assert any("4000x100" in m and "cropped away" in m for m in messages)


def test_the_launcher_shows_absolute_workdirs_as_given():
    out = subprocess.run(["bash", "-c", 'ROOT=/repo; source launch/common.sh; shown_path /abs/run; '
                          'shown_path runs/tiny; shown_path gs://b/run'], cwd=REPO_ROOT, capture_output=True,
                         text=True, check=True).stdout.split()
    assert out == ["/abs/run", "/repo/runs/tiny", "gs://b/run"]
