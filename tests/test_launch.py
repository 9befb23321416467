"""The launchers (launch/train.sh, launch/ablate.sh, launch/common.sh, launch/worker.sh) against stand-in `gcloud`,
`xpk`, `kubectl`, `uv` and `python` executables placed first on PATH: each records its arguments (one JSON line);
the stand-in gcloud also plays a 2-worker TPU VM slice (scp copies into each worker's home, ssh runs the command in
each with HOSTNAME set), the stand-in uv makes a venv whose python records instead of installing or training. The
launchers run from a throwaway git repo holding a copy of launch/ (so "uncommitted changes" is under the test's
control). No JAX, no network: what needs a real pod (uv's Python download, gcloud, GKE) is what the stand-ins replace.
"""
import json
import os
import pathlib
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest

from helpers import REPO_ROOT

STANDIN = f"""#!{sys.executable} -S
import json, os, pathlib, shutil, subprocess, sys
prog, args = pathlib.Path(sys.argv[0]).name, sys.argv[1:]
with open(os.environ["STANDIN_LOG"], "a") as f:
    f.write(json.dumps({{"prog": prog, "args": args, "cwd": os.getcwd(),
                        "jax_platforms": os.environ.get("JAX_PLATFORMS")}}) + "\\n")
here = pathlib.Path(os.environ["STANDIN_BIN"]) / "standin"
if prog == "gcloud" and "scp" in args:  # tpu-vm scp SRC NAME:DEST --worker=all
    src, dest = args[args.index("scp") + 1], args[args.index("scp") + 2].split(":", 1)[1]
    for home in sorted(pathlib.Path(os.environ["STANDIN_WORKERS"]).iterdir()):
        shutil.copy(src, home / dest)
elif prog == "gcloud" and "ssh" in args:  # tpu-vm ssh NAME --worker=all --command CMD: CMD on every worker
    cmd, rc = args[args.index("--command") + 1], 0
    for home in sorted(pathlib.Path(os.environ["STANDIN_WORKERS"]).iterdir()):
        env = dict(os.environ, HOME=str(home), HOSTNAME=home.name)
        rc = rc or subprocess.run(["bash", "-c", cmd], cwd=home, env=env).returncode
    sys.exit(rc)
elif prog == "xpk" and "create" in args:  # keep the image's tree (--script-dir is a temporary folder)
    shutil.copytree(args[args.index("--script-dir") + 1], os.environ["STANDIN_IMAGE"])
elif prog == "uv" and args[:1] == ["venv"]:  # a venv whose python is a stand-in too
    (pathlib.Path(args[-1]) / "bin").mkdir(parents=True)
    os.symlink(here, pathlib.Path(args[-1]) / "bin" / "python")
elif prog == "python3" and args[:3] == ["-m", "pip", "install"] and "uv" in args:  # pip install --user uv
    (pathlib.Path.home() / ".local/bin").mkdir(parents=True, exist_ok=True)
    os.symlink(here, pathlib.Path.home() / ".local/bin/uv")
"""


@pytest.fixture
def repo(tmp_path):
    """A committed copy of launch/ (and a stand-in setup.py, which launch/env.sh hashes) in a fresh git repo."""
    root = tmp_path / "repo"
    shutil.copytree(REPO_ROOT / "launch", root / "launch")
    (root / "setup.py").write_text("# stand-in\n")
    for cmd in (["init", "-q"], ["add", "-A"], ["-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "c"]):
        subprocess.run(["git", *cmd], cwd=root, check=True)
    return root


@pytest.fixture
def env(tmp_path):
    """Environment with the stand-ins first on PATH and two TPU workers' homes; env["calls"]() reads the records."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "standin").write_text(STANDIN)
    (bin_dir / "standin").chmod(0o755)
    for prog in ("gcloud", "xpk", "kubectl", "uv"):
        (bin_dir / prog).symlink_to(bin_dir / "standin")
    for w in ("tpu-w-0", "tpu-w-1"):
        (tmp_path / "workers" / w).mkdir(parents=True)
    e = {k: v for k, v in os.environ.items() if k not in ("VAREDIT_VENV", "PYTHON", "JAX_PLATFORMS")}
    e.update(PATH=f"{bin_dir}:{os.environ['PATH']}", STANDIN_BIN=str(bin_dir), STANDIN_LOG=str(tmp_path / "calls"),
             STANDIN_WORKERS=str(tmp_path / "workers"), STANDIN_IMAGE=str(tmp_path / "image"), TMPDIR=str(tmp_path),
             HOME=str(tmp_path / "home"), VAREDIT_STOP_WAIT_S="20")
    return e


def calls(env, prog=None) -> list[dict]:
    path = pathlib.Path(env["STANDIN_LOG"])
    rows = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
    return [r for r in rows if prog is None or r["prog"] == prog]


def launch(repo, env, script, *flags, check=True):
    proc = subprocess.run(["bash", f"launch/{script}", *flags], cwd=repo, env=env, capture_output=True, text=True,
                          timeout=60)
    if check:
        assert proc.returncode == 0, proc.stderr
    return proc


def wait_for(predicate, timeout=20.0):
    deadline = time.time() + timeout
    while not predicate():
        assert time.time() < deadline, "timed out"
        time.sleep(0.05)


TPU = ["--tpu", "my-v5p-128", "--zone", "us-east5-a", "--project", "my-proj"]
XPK = ["--xpk", "my-cluster", "--tpu-type", "v5p-128"]
G = ["compute", "tpus", "tpu-vm"]
WHERE = ["--worker=all", "--zone", "us-east5-a", "--project", "my-proj"]
REMOTE = ["--distributed", "--config.model.attention_impl=splash"]


# ------------------------------------------------------------------------------------------------ TPU VM slices
@pytest.mark.parametrize("script,entry", [
    ("train.sh", ["-m", "varedit_jax.train", "--config", "configs/varedit_2b_256.py"]),
    ("ablate.sh", ["-m", "varedit_jax.ablate", "--config", "configs/varedit_2b_256.py"]),
    ("train.sh --recipe", ["-m", "varedit_jax.recipe", "--recipe", "configs/recipe_2b.py"])])
def test_tpu_vm_start_ships_head_sets_up_each_worker_and_detaches(repo, env, tmp_path, script, entry):
    script, *recipe = script.split()
    which = ["--recipe", entry[-1]] if recipe else ["--config", entry[-1]]
    launch(repo, env, script, *which, "--workdir", "gs://b/run", *TPU, "--", "--config.batch_size=8")
    gcloud = calls(env, "gcloud")
    assert len(gcloud) == 2
    tarball = gcloud[0]["args"][4]
    assert re.fullmatch(re.escape(str(tmp_path)) + r"/tmp\.\w+/varedit_jax\.tar\.gz", tarball)
    assert gcloud[0]["args"] == [*G, "scp", tarball, "my-v5p-128:varedit_jax.tar.gz", *WHERE]
    run = ["python", *entry, "--workdir", "gs://b/run", "--config.batch_size=8", *REMOTE]
    assert gcloud[1]["args"] == [*G, "ssh", "my-v5p-128", *WHERE, "--command",
                                 "mkdir -p varedit_jax && tar -xzf varedit_jax.tar.gz -C varedit_jax && "
                                 "bash varedit_jax/launch/worker.sh start " + " ".join(run)]
    assert not pathlib.Path(tarball).exists()  # the local temporary is removed
    # On each worker: the committed tree, uv's 3.11 venv, the install, then the entry point in the background.
    for w in ("tpu-w-0", "tpu-w-1"):
        tree = tmp_path / "workers" / w / "varedit_jax"
        assert (tree / "launch" / "worker.sh").is_file() and not (tree / ".git").exists()
        uv = [c for c in calls(env, "uv") if c["cwd"] == str(tree)]
        assert [c["args"] for c in uv] == [["venv", "--seed", "--python", "3.11", ".venv"]]
        wait_for(lambda: any(c["args"][:2] == entry[:2] and c["cwd"] == str(tree) for c in calls(env, "python")))
        py = [c for c in calls(env, "python") if c["cwd"] == str(tree) and "-c" not in c["args"]]
        assert [c["args"] for c in py] == [["-m", "pip", "install", "-q", "--disable-pip-version-check",
                                            "-e", f"{tree}[tpu,data]"], run[1:]]
        assert py[1]["jax_platforms"] is None  # the TPU, not CPU
        log = (tree / "logs" / f"worker-{w}.log").read_text()
        assert "start: " + " ".join(run) in log


def test_tpu_vm_logs_and_stop_reach_every_worker(repo, env, tmp_path):
    env["STANDIN_WORKERS"] = str(tmp_path / "no_workers")  # record only (the worker side is tested below)
    (tmp_path / "no_workers").mkdir()
    for action in ("--logs", "--stop"):
        launch(repo, env, "train.sh", *TPU, action)
    assert [c["args"] for c in calls(env, "gcloud")] == [
        [*G, "ssh", "my-v5p-128", *WHERE, "--command", f"bash varedit_jax/launch/worker.sh {a}"]
        for a in ("logs", "stop")]


def test_worker_runs_detached_stop_saves_and_a_rerun_starts_again(repo, env):
    """worker.sh start: the run outlives the starting shell in its own session with one log; a second start is
    refused while it runs; stop sends SIGTERM (the run's save) and waits; a re-run starts again."""
    job = ["bash", "-c", 'trap "echo saved at step 7; exit 0" TERM; echo step 7; while :; do sleep 0.05; done']
    env = dict(env, HOSTNAME="w0")
    pidfile, log = repo / "logs" / "run.pid", repo / "logs" / "worker-w0.log"

    def worker(*args):
        return subprocess.run(["bash", "launch/worker.sh", *args], cwd=repo, env=env, capture_output=True,
                              text=True, timeout=60)

    def steps():
        return log.read_text().splitlines().count("step 7") if log.exists() else 0

    try:
        assert worker("start", *job).returncode == 0
        wait_for(lambda: pidfile.exists() and steps() == 1)
        pid = int(pidfile.read_text())
        assert os.getsid(pid) != os.getsid(0)  # its own session: an ssh drop (SIGHUP to ours) does not reach it
        again = worker("start", *job)
        assert again.returncode == 1 and f"still going (pid {pid})" in again.stderr
        stopped = worker("stop")
        assert stopped.returncode == 0 and "stopped" in stopped.stdout and "saved at step 7" in log.read_text()
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
        assert worker("stop").stdout.strip() == "[worker] w0: no run going"
        assert worker("start", *job).returncode == 0
        wait_for(lambda: pidfile.read_text().strip() not in ("", str(pid)) and steps() == 2)
        assert log.read_text().count(" start: ") == 2
    finally:  # whatever is still running
        pid = pidfile.read_text().strip() if pidfile.exists() else ""
        if pid and subprocess.run(["kill", "-0", pid], capture_output=True).returncode == 0:
            os.kill(int(pid), signal.SIGKILL)


def test_worker_setup_installs_uv_then_a_311_venv_once(repo, env, tmp_path):
    """Without uv on PATH (a stock TPU VM image): pip --user installs it, uv makes the 3.11 venv, launch/env.sh
    installs the tpu and data extras; a second setup changes nothing."""
    bin_dir = pathlib.Path(env["STANDIN_BIN"])
    (bin_dir / "uv").unlink()
    (bin_dir / "python3").symlink_to(bin_dir / "standin")
    for _ in range(2):
        done = subprocess.run(["bash", "launch/worker.sh", "setup"], cwd=repo, env=env, capture_output=True,
                              text=True, timeout=60)
        assert done.returncode == 0, done.stderr
    assert [(c["prog"], c["args"]) for c in calls(env) if "-c" not in c["args"]] == [
        ("python3", ["-m", "pip", "install", "-q", "--user", "uv"]),
        ("uv", ["venv", "--seed", "--python", "3.11", ".venv"]),
        ("python", ["-m", "pip", "install", "-q", "--disable-pip-version-check", "-e", f"{repo}[tpu,data]"])]


def test_worker_rejects_an_unknown_command(repo, env):
    bad = subprocess.run(["bash", "launch/worker.sh", "begin"], cwd=repo, env=env, capture_output=True, text=True)
    assert bad.returncode == 2 and "unknown worker command 'begin'" in bad.stderr


# ------------------------------------------------------------------------------------------------ xpk
@pytest.mark.parametrize("script,module", [("train.sh", "varedit_jax.train"), ("ablate.sh", "varedit_jax.ablate")])
def test_xpk_start_creates_one_workload_on_python_311_with_the_committed_tree(repo, env, tmp_path, script, module):
    (repo / "scratch.txt").write_text("not committed")
    launch(repo, env, script, "--config", "configs/varedit_8b_512.py", "--workdir", "gs://b/runs/8B_512", *XPK,
           "--slices", "2", "--restarts", "3", "--project", "p", "--zone", "z")
    (xpk,) = calls(env, "xpk")
    script_dir = xpk["args"][xpk["args"].index("--script-dir") + 1]
    run = (f"python -m {module} --config configs/varedit_8b_512.py --workdir gs://b/runs/8B_512 {' '.join(REMOTE)} "
           "--config.mesh.slices=2")
    assert xpk["args"] == ["workload", "create", "--cluster", "my-cluster", "--workload", "varedit-8b-512",
                           "--tpu-type", "v5p-128", "--num-slices", "2", "--project", "p", "--zone", "z",
                           "--base-docker-image", "python:3.11", "--script-dir", script_dir,
                           "--termination-grace-period-seconds", "900", "--max-restarts", "3", "--command",
                           f"bash launch/worker.sh setup && exec bash launch/worker.sh run {run}"]
    image = pathlib.Path(env["STANDIN_IMAGE"])
    assert (image / "launch/worker.sh").is_file() and not (image / "scratch.txt").exists()
    assert not pathlib.Path(script_dir).exists()
    # The pod's command (as xpk's container runs it, from the image's tree): setup, then the entry point.
    pod = subprocess.run(["bash", "-c", xpk["args"][-1]], cwd=image, env=env, capture_output=True, text=True,
                         timeout=60)
    assert pod.returncode == 0, pod.stderr
    assert calls(env, "python")[-1]["args"] == run.split()[1:] and calls(env, "uv")[-1]["cwd"] == str(image)


def test_xpk_logs_and_stop_address_the_workload(repo, env):
    launch(repo, env, "train.sh", "--workdir", "gs://b/runs/2b_256", *XPK, "--logs")
    launch(repo, env, "train.sh", "--workdir", "gs://b/runs/2b_256", *XPK, "--name", "mine", "--stop")
    assert [(c["prog"], c["args"]) for c in calls(env)] == [
        ("kubectl", ["logs", "-f", "--prefix", "--tail=100", "--max-log-requests=1000", "-c", "jax-tpu", "-l",
                     "jobset.sigs.k8s.io/jobset-name=varedit-2b-256"]),
        ("xpk", ["workload", "delete", "--cluster", "my-cluster", "--workload", "mine"])]


# ------------------------------------------------------------------------------------------------ refusals, local
def test_uncommitted_changes_are_refused_unless_allowed(repo, env):
    (repo / "launch" / "train.sh").write_text((repo / "launch" / "train.sh").read_text() + "\n# edited\n")
    refused = launch(repo, env, "train.sh", "--workdir", "gs://b/r", *TPU, check=False)
    assert refused.returncode == 1 and "uncommitted changes" in refused.stderr and "launch/train.sh" in refused.stderr
    assert calls(env) == []
    allowed = launch(repo, env, "train.sh", "--workdir", "gs://b/r", *XPK, "--allow-dirty")
    assert "WARNING: uncommitted changes are NOT shipped" in allowed.stderr
    assert "# edited" not in (pathlib.Path(env["STANDIN_IMAGE"]) / "launch/train.sh").read_text()


def test_a_workdir_off_gcs_is_warned_about(repo, env):
    proc = launch(repo, env, "ablate.sh", "--workdir", "/mnt/runs/a", *TPU)
    assert "/mnt/runs/a is not on gs://" in proc.stderr


@pytest.mark.parametrize("flags,message", [
    (["--bogus"], "unknown flag --bogus"),
    (["--config"], "--config needs a value"),
    (["--workdir", "--dry-run"], "--workdir needs a value"),
    (["--tpu", "t"], "--tpu needs --zone and --project"),
    ([*TPU, *XPK], "not both"),
    (["--xpk", "c"], "--xpk needs --tpu-type"),
    (["--slices", "2"], "--slices needs --xpk"),
    ([*TPU, "--name", "n"], "--name needs --xpk"),
    ([*XPK, "--slices", "0"], "--slices must be an integer >= 1"),
    ([*XPK, "--restarts", "x"], "--restarts must be an integer >= 0"),
    ([*XPK, "--name", "Bad_Name"], "--name must be lowercase"),
    (["--logs"], "--logs needs --tpu or --xpk"),
    (["--stop"], "--stop needs --tpu or --xpk"),
    (["--config", "c.py", "--recipe", "r.py"], "--config or --recipe, not both")])
def test_bad_flags_exit_2_with_one_line(repo, env, flags, message):
    for script in ("train.sh", "ablate.sh"):
        proc = launch(repo, env, script, *flags, check=False)
        assert proc.returncode == 2 and message in proc.stderr and len(proc.stderr.splitlines()) == 1, proc.stderr
    assert calls(env) == []


def test_ablate_has_no_recipe(repo, env):
    proc = launch(repo, env, "ablate.sh", "--recipe", "r.py", check=False)
    assert proc.returncode == 2 and "--recipe is launch/train.sh's" in proc.stderr


def test_dry_runs_print_commands_and_paths(repo, env):
    out = launch(repo, env, "train.sh", "--workdir", "/abs/path", "--dry-run").stdout.splitlines()
    assert out == ["source launch/env.sh data; JAX_PLATFORMS=cpu python -m varedit_jax.train --config "
                   "configs/varedit_tiny.py --workdir /abs/path ", "(dry run) outputs would be in /abs/path"]
    out = launch(repo, env, "train.sh", "--recipe", "configs/recipe_tiny.py", "--dry-run").stdout.splitlines()
    assert out == ["source launch/env.sh data; JAX_PLATFORMS=cpu python -m varedit_jax.recipe --recipe "
                   "configs/recipe_tiny.py --workdir runs/recipe_tiny ",
                   f"(dry run) outputs would be in {repo}/runs/recipe_tiny"]
    out = launch(repo, env, "ablate.sh", "--workdir", "gs://b/a", "--dry-run").stdout
    assert "python -m varedit_jax.ablate --config configs/varedit_tiny.py --workdir gs://b/a" in out
    remote = launch(repo, env, "train.sh", "--workdir", "gs://b/r", *TPU, "--dry-run").stdout
    assert "gcloud compute tpus tpu-vm ssh my-v5p-128 --worker=all" in remote
    assert calls(env) == []  # nothing ran


def test_a_local_run_uses_the_venv_on_cpu_and_reports_its_outputs(repo, env, tmp_path):
    """The local path, with a stand-in venv (its stamp current, so nothing is installed) whose python records."""
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "python").symlink_to(pathlib.Path(env["STANDIN_BIN"]) / "standin")
    stamp = subprocess.run(["bash", "-c", "echo \"$(sha1sum < setup.py | cut -d' ' -f1) [data]\""], cwd=repo,
                           capture_output=True, text=True, check=True).stdout
    (venv / ".varedit_stamp").write_text(stamp)
    proc = launch(repo, dict(env, VAREDIT_VENV=str(venv)), "train.sh", "--", "--config.total_steps=2")
    (run,) = [c for c in calls(env, "python") if "-c" not in c["args"]]
    assert run["args"] == ["-m", "varedit_jax.train", "--config", "configs/varedit_tiny.py", "--workdir",
                           "runs/varedit_tiny", "--config.total_steps=2"]
    assert run["jax_platforms"] == "cpu" and run["cwd"] == str(repo)
    assert f"Outputs in {repo}/runs/varedit_tiny:" in proc.stdout
