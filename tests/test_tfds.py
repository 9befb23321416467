"""TFDS builders (data_pipelines/tfds_builders.py, tfds_build CLI): each built from small raw-format samples without
TensorFlow, read back with `tfds.data_source`, equal to what the project's own readers give, and streamed into a
training step as `tfds:NAME@DATA_DIR` dataset paths."""
import json
import sys

import numpy as np
import pytest

pytest.importorskip("pyarrow", reason="the ImgEdit / EMU-Edit raw layouts need the data extra (pyarrow)")
tfds = pytest.importorskip("tensorflow_datasets")

from data_pipelines import benchmarks, build, records, tfds_build, tfds_builders  # noqa: E402
from helpers import small_config  # noqa: E402
from test_data_pipelines import make_imgedit, make_seed_edit  # noqa: E402
from test_evaluate import write_benchmarks  # noqa: E402


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """Raw copies of the four datasets and their TFDS builds in one data dir."""
    root = tmp_path_factory.mktemp("tfds")
    make_seed_edit(str(root / "seed"))
    make_imgedit(str(root / "imgedit"))
    write_benchmarks(root / "bench", models=False)
    raws = {"seed_edit": root / "seed", "imgedit": root / "imgedit", "emu_edit": root / "bench" / "emu",
            "pie_bench": root / "bench" / "pie"}
    for name, raw in raws.items():
        assert tfds_build.main(["--builder", name, "--manual_dir", str(raw), "--data_dir", str(root / "out")]) == 0
    return root, raws


@pytest.mark.parametrize("name,reader", [("seed_edit", "seed_edit"), ("imgedit", "imgedit")])
def test_pair_builders_hold_what_the_record_build_holds(built, tmp_path, name, reader):
    root, raws = built
    ds = tfds.data_source(name, split="train", data_dir=str(root / "out"))  # no builder code needed to read
    got = {ex["id"].decode(): ex for ex in (ds[i] for i in range(len(ds)))}
    assert build.main(["--format", reader, "--src", str(raws[name]), "--out", str(tmp_path / "rec")]) == 0
    want = {r["id"]: r for r in records.iter_records(str(tmp_path / "rec"))}
    assert set(got) == set(want) and len(got) >= 3
    for rid, rec in want.items():
        ex = got[rid]
        assert ex["instruction"].decode() == rec["instruction"] and ex["task"].decode() == rec["task"]
        np.testing.assert_array_equal(ex["source"], benchmarks.decode_image(rec["source"]))
    pairs = tfds_builders.PairSource(f"tfds:{name}@{root / 'out'}")  # raw image bytes, as the records hold them
    by_id = {pairs[i]["id"]: pairs[i] for i in range(len(pairs))}
    assert all(by_id[rid]["source"] == rec["source"] and by_id[rid]["target"] == rec["target"]
               for rid, rec in want.items())
    assert "tensorflow" not in sys.modules


def test_benchmark_builders_give_the_loaders_samples(built):
    root, raws = built
    for name in ("emu_edit", "pie_bench"):
        direct = list(benchmarks.load(name, raws[name]))
        via = list(benchmarks.load(name, f"tfds:{name}@{root / 'out'}"))
        assert [s.id for s in via] == [s.id for s in direct] and len(direct) >= 2
        for a, b in zip(direct, via):
            np.testing.assert_array_equal(a.source, b.source)
            assert (a.instruction, a.target_caption, a.category, a.extra) == \
                (b.instruction, b.target_caption, b.category, json.loads(json.dumps(b.extra)))
            assert (a.mask is None and b.mask is None) or np.array_equal(a.mask, b.mask)


def test_bad_builds_and_names(built, tmp_path, capsys):
    root, _ = built
    assert tfds_build.main(["--builder", "seed_edit", "--manual_dir", str(tmp_path / "none"),
                            "--data_dir", str(tmp_path)]) == 2
    assert "does not exist" in capsys.readouterr().err and "SEED-Data-Edit" in tfds_builders.SeedEdit.__doc__
    with pytest.raises(ValueError, match="tfds:NAME@DATA_DIR"):
        records.Pairs(["tfds:seed_edit"])
    with pytest.raises(FileNotFoundError, match="not built"):
        records.Pairs([f"tfds:imgedit@{tmp_path}"])


def test_tfds_and_record_datasets_stream_into_a_training_step(built, trained_run, tmp_path):
    from varedit_jax import train
    root, raws = built
    assert build.main(["--format", "imgedit", "--src", str(raws["imgedit"]), "--out", str(tmp_path / "rec")]) == 0
    paths = (f"tfds:seed_edit@{root / 'out'}", str(tmp_path / "rec"))
    assert len(records.Pairs(paths)) == len(records.Pairs(paths[:1])) + len(records.Pairs(paths[1:]))
    summary = train.train(small_config(**{"total_steps": 1, "checkpoint_every": 1, "data.paths": paths}),
                          tmp_path / "run")
    assert summary["step"] == 1 and np.isfinite(summary["final_loss"])
    assert summary["records_read"] >= 8 and sum(summary["data_replaced"].values()) == 0
