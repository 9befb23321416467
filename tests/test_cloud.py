"""gs:// everywhere, against the session's GCS emulator on 127.0.0.1 (tests/conftest.py `gcs`): storage paths and
mirrors, a dataset built to and trained from gs://, a gs:// workdir killed with -9 and resumed, `convert export` and
`describe` of gs:// locations, and an unreachable endpoint that fails fast with one line."""
import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import safetensors.numpy

from helpers import REPO_ROOT, data_digests, final_params, small_config, small_flags, train_subprocess
from varedit_jax import assets, images, storage, text
from varedit_jax.convert.__main__ import main as convert
from varedit_jax.eval import report
from data_pipelines import build, describe, records


def _blob_exists(url: str) -> bool:
    """Asked of the server directly (gcsfs caches listings)."""
    from google.cloud import storage as gcs
    bucket, name = url[len("gs://"):].split("/", 1)
    return gcs.Client().bucket(bucket).blob(name).exists()


def test_paths_files_and_mirrors(gcs, tmp_path):
    root = storage.path(f"{gcs}/paths")
    assert storage.is_remote(root) and str(root / "a") == f"{gcs}/paths/a"
    assert storage.path("~/x") == storage.path(os.path.expanduser("~/x"))
    storage.write_text(root / "d" / "t.txt", "hello")
    assert (root / "d" / "t.txt").read_text() == "hello"
    with storage.staged(root / "up.bin") as local:
        local.write_bytes(b"\x00\x01")
    with storage.local_copy(root / "up.bin") as local:
        assert local.read_bytes() == b"\x00\x01"
    mirror = storage.Mirror(root / "run")
    (mirror.local / "m.jsonl").write_text("1\n")
    assert mirror.push() == 1 and mirror.push() == 0  # only what changed is uploaded
    with open(mirror.local / "m.jsonl", "a") as f:
        f.write("2\n")
    assert mirror.push() == 1 and (root / "run" / "m.jsonl").read_text() == "1\n2\n"
    again = storage.Mirror(root / "run")
    again.pull("m.jsonl")
    assert (again.local / "m.jsonl").read_text() == "1\n2\n"
    paths = report.write_table([{"a": 1.0}], root / "tables", "t")
    assert paths["md"].read_text().startswith("| a |") and storage.Mirror(tmp_path).local == tmp_path


def test_an_object_rewritten_elsewhere_is_read_whole(gcs):
    """A long-lived reader (this process listed the folder and read the object) sees another writer's longer
    version whole: gcsfs would otherwise read the newer object cut to the size in its listings cache."""
    from google.cloud import storage as gcs_client
    root = storage.path(f"{gcs}/rewritten")
    storage.write_text(root / "metrics.jsonl", "1\n")
    assert [p.name for p in root.iterdir()] == ["metrics.jsonl"] and (root / "metrics.jsonl").exists()
    assert (root / "metrics.jsonl").read_text() == "1\n"
    blob = gcs_client.Client().bucket(storage.bucket_of(gcs)).blob("rewritten/metrics.jsonl")
    blob.upload_from_string("1\n2\n3\n")  # another client: nothing in this process's gcsfs saw it
    assert (root / "metrics.jsonl").read_text() == "1\n2\n3\n"


def _killed_and_resumed(workdir: str, data_dir: str) -> None:
    """Trains 4 steps in `workdir` on `data_dir`, killed (SIGKILL) after its step-2 checkpoint, then resumed."""
    flags = small_flags(total_steps=4, checkpoint_every=2, **{"data.paths": f"('{data_dir}',)"})
    killed = train_subprocess([f"--workdir={workdir}", *flags])
    deadline = time.time() + 600
    while not _blob_exists(f"{workdir}/checkpoints/2/commit_success.txt") and killed.poll() is None \
            and time.time() < deadline:
        time.sleep(0.05)
    killed.send_signal(signal.SIGKILL)
    killed.wait(60)
    assert killed.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    resumed = train_subprocess([f"--workdir={workdir}", *flags])
    out = resumed.communicate(timeout=600)[0]
    assert resumed.returncode == 0 and "resumed" in out, out


@pytest.mark.slow
def test_a_gs_dataset_and_workdir_killed_and_resumed_equal_a_straight_run(gcs, trained_run, tmp_path, capsys):
    """The toy training set built onto gs:// (as the session's local one: 48 pairs, seed 0, other shard sizes),
    trained in a gs:// workdir, killed and resumed, ends where the session's local straight run (`trained_run`)
    ended; its checkpoint exports to gs:// as the local one does to a local file."""
    straight, _ = trained_run
    data_dir = f"{gcs}/data/toy"
    assert build.main(["--format", "toy", "--num", "48", "--out", data_dir, "--shard-size", "20"]) == 0
    assert describe.main([data_dir, "--n", "2", "--grid", f"{gcs}/data/grid.png"]) == 0
    assert "48 records" in capsys.readouterr().out and _blob_exists(f"{gcs}/data/grid.png")
    _killed_and_resumed(f"{gcs}/killed", data_dir)
    for a, b in zip(final_params(straight), final_params(f"{gcs}/killed"), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-6)
    resumed = data_digests(f"{gcs}/killed")
    assert sorted(resumed) == list(range(1, 5)) and resumed == data_digests(straight)  # each step once, same order
    rows = (storage.path(f"{gcs}/killed") / "metrics.jsonl").read_text()
    assert '"split": "restart"' in rows and _blob_exists(f"{gcs}/killed/summary.json")
    assert _blob_exists(f"{gcs}/killed/tb/" + next((storage.path(gcs) / "killed" / "tb").iterdir()).name)
    # convert export from the gs:// checkpoint to gs://, and from the local straight run to a local file: the same
    assert convert(["export", "--checkpoint", f"{gcs}/killed", "--out", f"{gcs}/export/m.safetensors"]) == 0
    assert convert(["export", "--checkpoint", str(straight), "--out", str(tmp_path / "m.safetensors")]) == 0
    with storage.local_copy(f"{gcs}/export/m.safetensors") as local:
        remote = safetensors.numpy.load_file(local)
    here = safetensors.numpy.load_file(tmp_path / "m.safetensors")
    assert remote.keys() == here.keys()
    for k in here:
        np.testing.assert_allclose(remote[k], here[k], atol=1e-6)


@pytest.mark.parametrize("command", [
    ["-m", "varedit_jax.train", "--config", "configs/varedit_tiny.py", "--workdir", "gs://varedit-test/run"],
    ["-m", "data_pipelines.build", "--format", "toy", "--num", "4", "--out", "gs://varedit-test/toy"],
])
def test_an_unreachable_endpoint_fails_fast_with_one_line(command):
    env = dict(os.environ, **storage.emulator_environment("http://127.0.0.1:9"), JAX_PLATFORMS="cpu")
    t0 = time.time()
    proc = subprocess.run([sys.executable, *command], cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                          timeout=120)
    assert time.time() - t0 < 30 and proc.returncode == 2, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "cannot reach gs://varedit-test" in errors[0] and "Traceback" not in proc.stderr


def test_staging_a_gs_dataset_and_reading_assets_from_gs(gcs, tmp_path, monkeypatch):
    """data.stage_dir copies a gs:// dataset once (a second call copies nothing) and is refused when the disk is too
    small; a sentencepiece model and an image read from gs://."""
    remote = f"{gcs}/staging/toy"
    assert build.main(["--format", "toy", "--num", "6", "--out", remote]) == 0
    local = records.stage(remote, tmp_path / "stage")
    assert [r["id"] for r in records.iter_records(local)] == [r["id"] for r in records.iter_records(remote)]
    first = {f.name: f.stat().st_mtime_ns for f in pathlib.Path(local).iterdir()}
    assert records.stage(remote, tmp_path / "stage") == local
    assert {f.name: f.stat().st_mtime_ns for f in pathlib.Path(local).iterdir()} == first  # nothing copied again
    monkeypatch.setattr(records.shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(1 << 40, 1 << 40, 10))
    with pytest.raises(OSError, match="free"):
        records.stage(remote, tmp_path / "other")
    spiece = pathlib.Path(assets.resolve(small_config()).data.spiece_model)  # the toy text encoder's
    storage.path(f"{gcs}/assets/spiece.model").write_bytes(spiece.read_bytes())
    ids_remote = text.TextTokenizer(f"{gcs}/assets/spiece.model")(["make the circle red"], 8)[0]
    np.testing.assert_array_equal(ids_remote, text.TextTokenizer(spiece)(["make the circle red"], 8)[0])
    storage.write_bytes(f"{gcs}/assets/im.png", images.png_bytes(np.full((4, 5, 3), 7, np.uint8)))
    assert images.read(f"{gcs}/assets/im.png").shape == (4, 5, 3)


def _upload(local: pathlib.Path, remote: str) -> str:
    for f in local.rglob("*"):
        if f.is_file():
            storage.path(f).copy(storage.path(remote) / f.relative_to(local).as_posix(), overwrite=True)
    return remote


def test_benchmarks_load_from_gs_as_from_local(gcs, tmp_path):
    """EMU-Edit (parquet), PIE-Bench (mapping_file.json + images) and GEdit-Bench (Arrow, nested) from gs://."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from data_pipelines import benchmarks as bm
    from test_eval_benchmarks import _emu_table, _gedit_table, _png
    (tmp_path / "emu" / "data").mkdir(parents=True)
    pq.write_table(_emu_table([("add a hat", _png(10), "add"), ("make it night", _png(20), "global")]),
                   tmp_path / "emu" / "data" / "test-00000-of-00001.parquet")
    pie = tmp_path / "pie" / "annotation_images" / "0_random_140"
    pie.mkdir(parents=True)
    storage.write_bytes(pie / "a.png", images.png_bytes(np.zeros((512, 512, 3), np.uint8)))
    (tmp_path / "pie" / "mapping_file.json").write_text(json.dumps({"000000000000": {
        "image_path": "0_random_140/a.png", "original_prompt": "a [cat]", "editing_prompt": "a [dog]",
        "editing_instruction": "make the cat a dog", "editing_type_id": "0", "blended_word": "cat dog",
        "mask": [0, 10]}}))
    (tmp_path / "gedit" / "train").mkdir(parents=True)
    table = _gedit_table([("subject-add", "k1", "add a bird", "en", _png(50))])
    with pa.ipc.new_stream(str(tmp_path / "gedit" / "train" / "data-00000-of-00001.arrow"), table.schema) as w:
        w.write_table(table)
    for name, load in (("emu", lambda r: bm.emu_edit(r, "test")), ("pie", bm.pie_bench), ("gedit", bm.gedit_bench)):
        here = list(load(tmp_path / name))
        there = list(load(_upload(tmp_path / name, f"{gcs}/bench/{name}")))
        assert here and [s.id for s in there] == [s.id for s in here], name
        np.testing.assert_array_equal(there[0].source, here[0].source)
