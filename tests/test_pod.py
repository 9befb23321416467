"""Long runs across hosts, simulated with local processes: preemption through JAX's preemption service (SIGTERM to
one of two processes, gs:// workdir), resuming with another process count, the hang watchdog, what checkpoints
record (git commit, process count) and keep their milestones (keep_period)."""
import json
import os
import signal
import socket
import tempfile
import threading
import time

import numpy as np
import pytest

from helpers import data_digests, small_config, small_flags, train_subprocess
from varedit_jax import checkpoint, recipe, storage, train, watchdog


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _blob_exists(url: str) -> bool:
    from google.cloud import storage as gcs
    bucket, name = url[len("gs://"):].split("/", 1)
    return gcs.Client().bucket(bucket).blob(name).exists()


def _train_rows(workdir) -> list[dict]:
    lines = (storage.path(workdir) / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["split"] == "train"]


@pytest.mark.slow
def test_sigterm_to_one_of_two_processes_saves_one_step_and_resumes_on_one(gcs, tmp_path):
    """Both processes stop at the same step and save it once (gs://), exit 0; the run then resumes with one
    process (the data position re-split) and reads exactly the pairs a straight one-process run reads."""
    total = 10
    flags = small_flags(total_steps=total, checkpoint_every=2, **{"text.drop_rate": 0.0,
                                                                    "bsc.noise_apply_layers": 0})
    straight = train_subprocess([f"--workdir={tmp_path / 'straight'}", *flags])
    workdir, port = f"{gcs}/preempted", _free_port()
    env = {"XLA_FLAGS": os.environ["XLA_FLAGS"].replace("device_count=8", "device_count=4")}
    procs = [train_subprocess([f"--workdir={workdir}", *flags, f"--coordinator=127.0.0.1:{port}",
                               "--num_processes=2", f"--process_id={i}"], env) for i in range(2)]
    deadline = time.time() + 600
    while not _blob_exists(f"{workdir}/checkpoints/2/commit_success.txt") and time.time() < deadline \
            and all(p.poll() is None for p in procs):
        time.sleep(0.1)
    procs[1].send_signal(signal.SIGTERM)  # one host only
    outs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    assert all("preempted: checkpoint saved" in out for out in outs[:1]), outs[0]
    stopped = checkpoint.resolve(workdir)[1]
    assert 2 <= stopped < total, f"stopped at {stopped}: the run ended before the preemption"
    info = json.loads((storage.path(workdir) / "checkpoints" / str(stopped) / "run" / "metadata").read_text())
    assert info["process_count"] == 2 and info["git_commit"]
    resumed = train_subprocess([f"--workdir={workdir}", *flags])
    out = resumed.communicate(timeout=600)[0]
    assert resumed.returncode == 0 and "re-split over 1" in out, out
    assert straight.wait(600) == 0, straight.stdout.read()
    want, got = data_digests(tmp_path / "straight"), data_digests(workdir)
    assert sorted(got) == list(range(1, total + 1)) and got == want  # no pair repeated or lost
    np.testing.assert_allclose([r["loss"] for r in _train_rows(workdir)],
                               [r["loss"] for r in _train_rows(tmp_path / "straight")], rtol=2e-3)


def test_watchdog_reports_a_hung_step_and_exits(monkeypatch):
    exits, done = [], threading.Event()
    monkeypatch.setattr(watchdog, "exit_process", lambda code: (exits.append(code), done.set()))
    config = watchdog.default_config()
    config.update(factor=3.0, warmup_steps=3, min_s=0.2, grace_s=0.3)
    with tempfile.TemporaryFile("w+") as err:
        monkeypatch.setattr("sys.stderr", err)
        with watchdog.Watchdog(config, poll_s=0.05) as dog:
            for step in range(1, 4):
                dog.begin(step)
                assert dog.limit_s() is None  # warm-up
                time.sleep(0.02)
                dog.end(step)
            assert dog.limit_s() == pytest.approx(0.2)  # min_s > 3 x ~0.02 s
            dog.begin(4)
            assert done.wait(10)
        err.seek(0)
        text = err.read()
    assert exits == [watchdog.HANG_EXIT_CODE]
    assert "step 4 has run" in text and "last finished step 3" in text and "Thread" in text


def test_a_hung_training_step_ends_the_run_with_the_hang_code(tmp_path, monkeypatch):
    """The loop brackets its steps: a step that never returns is reported and ends the process (here: the exit
    releases the hung step so the test can go on)."""
    release = threading.Event()
    exits = []
    monkeypatch.setattr(watchdog, "exit_process", lambda code: (exits.append(code), release.set()))
    real = train._run_step

    def run_step(run, state, step, compiled):
        if step == 4:
            release.wait(600)
            raise SystemExit("hung")
        return real(run, state, step, compiled)

    monkeypatch.setattr(train, "_run_step", run_step)
    config = small_config(total_steps=6, checkpoint_every=2, **{"watchdog.factor": 3.0, "watchdog.warmup_steps": 2,
                                                                  "watchdog.min_s": 0.5, "watchdog.grace_s": 0.1})
    with pytest.raises(SystemExit, match="hung"):
        train.train(config, tmp_path)
    assert exits == [watchdog.HANG_EXIT_CODE] and checkpoint.resolve(tmp_path)[1] == 4


def test_keep_period_keeps_milestones_and_checkpoints_record_the_run(trained_run, tmp_path):
    workdir, _ = trained_run
    info = json.loads((workdir / "checkpoints" / "4" / "run" / "metadata").read_text())
    assert info["process_count"] == 1 and info["git_commit"] == checkpoint.git_commit()
    config = small_config(total_steps=4, checkpoint_every=1, keep_checkpoints=1, keep_period=3)
    train.train(config, tmp_path)
    assert sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit()) == [3, 4]


@pytest.mark.slow
def test_a_two_stage_recipe_continues_where_it_stopped(tmp_path, capsys):
    """The tiny recipe (64 px, then 128 px from stage 1's EMA): preempted in stage 2, the same command continues
    there; finished stages are skipped."""
    flags = small_flags(total_steps=6, checkpoint_every=2)
    stop = threading.Event()

    def preempt_in_stage_2():
        while not (tmp_path / "2_128px" / "checkpoints" / "2").is_dir() and not stop.wait(0.05):
            pass
        os.kill(os.getpid(), signal.SIGTERM)

    watcher = threading.Thread(target=preempt_in_stage_2, daemon=True)
    watcher.start()
    assert recipe.main(["--recipe", "configs/recipe_tiny.py", "--workdir", str(tmp_path), *flags]) == 0
    stop.set()
    watcher.join()
    out = capsys.readouterr().out
    assert f"initialised from {tmp_path / '1_64px'} (ema)" in out and "stopped at step" in out
    assert checkpoint.resolve(tmp_path / "1_64px")[1] == 6 and checkpoint.resolve(tmp_path / "2_128px")[1] < 6
    assert checkpoint.load_config(tmp_path / "2_128px").pn == "0.25M"
    assert recipe.main(["--recipe", "configs/recipe_tiny.py", "--workdir", str(tmp_path), *flags]) == 0
    out = capsys.readouterr().out
    assert "1_64px is finished" in out and "resumed" in out
    assert checkpoint.resolve(tmp_path / "2_128px")[1] == 6
