"""Offline builders: tiny raw datasets in each released layout -> records; counts, skips, filter, resume, CLIs."""
import io
import json
import os

import numpy as np
import pytest
from PIL import Image

from data_pipelines import build, describe, records, webdataset

RNG = np.random.default_rng(0)


def _image_bytes(h: int, w: int, fmt: str = "PNG") -> bytes:
    arr = RNG.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format=fmt)
    return buf.getvalue()


def _write(path, data: bytes) -> bytes:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)
    return data


CORRUPT = b"\xff\xd8\xff\xe0 this is not a JPEG"


def _jsonl(path, rows) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        for row in rows:
            f.write(row if isinstance(row, str) else json.dumps(row))
            f.write("\n")


def make_seed_edit(root) -> dict:
    """A SEED-Data-Edit tree: a single-turn part (Part 2 layout) and a multi-turn part with an extra data/ level."""
    files = {}
    part2 = os.path.join(root, "real_editing")
    for name in ("a_src.jpg", "a_tgt.jpg", "b_src.jpg", "b_tgt.jpg", "d_src.jpg", "d_tgt.jpg"):
        files[name] = _write(os.path.join(part2, "images", name), _image_bytes(24, 32, "JPEG"))
    _write(os.path.join(part2, "images", "c_tgt.jpg"), CORRUPT)
    _jsonl(os.path.join(part2, "annotations", "split_0001.jsonl"), [
        {"source_image": "a_src.jpg", "target_image": "a_tgt.jpg", "instruction": "make the sky purple"},  # 1 ok
        {"source_image": "b_src.jpg", "target_image": "missing.jpg", "instruction": "add a dog"},  # 2 missing
        {"source_image": "a_src.jpg", "target_image": "c_tgt.jpg", "instruction": "remove the car"},  # 3 corrupt
        {"source_image": "b_src.jpg", "target_image": "b_tgt.jpg", "instruction": "   "},  # 4 empty instruction
        "{not json",  # 5 bad annotation
        {"source_image": "d_src.jpg", "target_image": "d_tgt.jpg", "instruction": " turn it into a painting ",
         "instruction_ori": "painting", "source_caption": "x"},  # 6 ok, extra keys
    ])
    with open(os.path.join(part2, "annotations", "split_0001.jsonl"), "ab") as f:
        f.write(b'{"instruction": "caf\xe9"}\n')  # 7 not UTF-8: bad annotation
    part3 = os.path.join(root, "multi_turn_editing")
    seq = "20240407_586P_2211turns/Data/1/h"
    for name in ("", "_edit1", "_edit2", "_edit3"):
        files[f"m{name}"] = _write(os.path.join(part3, "images", "data", f"{seq}{name}.jpg"),
                                   _image_bytes(20, 20, "JPEG"))
    bad = "20240330_315P_1323turns/Data/209/z"
    _write(os.path.join(part3, "images", f"{bad}.jpg"), _image_bytes(8, 8))
    _jsonl(os.path.join(part3, "annotations", "split_0001.jsonl"), [
        {"source_image": f"{seq}.jpg", "instruction_1": "first", "edit_image_1": f"{seq}_edit1.jpg",
         "instruction_2": "second", "edit_image_2": f"{seq}_edit2.jpg",
         "instruction_3": "third", "edit_image_3": f"{seq}_edit3.jpg"},
        {"source_image": f"{bad}.jpg", "instruction_1": "x", "edit_image_1": f"{bad}_edit1.jpg",
         "instruction_2": "y", "edit_image_2": f"{bad}_edit2.jpg"},
    ])
    return files


def make_imgedit(root) -> dict:
    import pyarrow as pa
    import pyarrow.parquet as pq
    files = {}
    single = os.path.join(root, "Singleturn")
    for d in ("results_add_part0/001", "results_add_part0/002", "results_hybrid_part0/001",
              "results_action_part0/007", "results_reference_extract_part0/001"):
        for name in ("original.png", "result.png"):
            files[f"{d}/{name}"] = _write(os.path.join(single, d, name), _image_bytes(16, 24))
    _write(os.path.join(single, "results_add_part0/003/original.png"), _image_bytes(16, 24))
    parquet = os.path.join(root, "Parquet")
    os.makedirs(parquet)
    pq.write_table(pa.table({
        "input_images": [["results_add_part0/001/original.png"], ["results_add_part0/002/original.png"],
                         ["results_add_part0/003/original.png"]],
        "output_images": [["results_add_part0/001/result.png"], ["results_add_part0/002/result.png"],
                          ["results_add_part0/003/result.png"]],
        "prompt": ["add a hat", "add a cat", "add a boat"]}), os.path.join(parquet, "add_part0.parquet"))
    pq.write_table(pa.table({  # nested lists and the old results_compose prefix
        "input_images": [[["results_compose_part0/001/original.png"]]],
        "output_images": [[["results_compose_part0/001/result.png"]]],
        "prompt": ["replace the sky and add a moon"]}), os.path.join(parquet, "hybrid_part0.parquet"))
    pq.write_table(pa.table({  # a path without the archive folder
        "input_images": [["007/original.png"]], "output_images": [["007/result.png"]], "prompt": ["make him jump"]}),
        os.path.join(parquet, "action_part0.parquet"))
    pq.write_table(pa.table({  # two inputs: not a one-to-one edit
        "input_images": [["results_reference_extract_part0/001/original.png", "results_add_part0/001/result.png"]],
        "output_images": [["results_reference_extract_part0/001/result.png"]], "prompt": ["extract the cup"]}),
        os.path.join(parquet, "reference_extract_part0.parquet"))
    multi = os.path.join(root, "Multiturn", "results_content_memory_part0", "001")
    for name in ("origin_0.png", "result_0.png", "result_1.png"):
        files[f"mt/{name}"] = _write(os.path.join(multi, name), _image_bytes(16, 16))
    rel = "results_content_memory_part0/001"
    pq.write_table(pa.table({"data": [[
        {"input_images": [f"{rel}/origin_0.png"], "output_images": [f"{rel}/result_0.png"], "prompt": "turn 1"},
        {"input_images": [f"{rel}/result_0.png"], "output_images": [f"{rel}/result_1.png"], "prompt": "turn 2"}]]}),
        os.path.join(parquet, "content_memory_part0.parquet"))
    _write(os.path.join(parquet, "remove_part0.parquet"), b"PAR1 damaged")
    return files


def make_webdataset(root) -> dict:
    samples = {f"s{i:03d}": {"src.jpg": _image_bytes(20, 30, "JPEG"), "tgt.jpg": _image_bytes(20, 30, "JPEG"),
                             "txt": f"edit number {i}".encode()} for i in range(5)}
    samples["s001"]["src.jpg"] = CORRUPT
    del samples["s002"]["tgt.jpg"]
    samples["s003"]["txt"] = b""
    keys = sorted(samples)
    os.makedirs(root)
    webdataset.write_shard(os.path.join(root, "wds_x_0000.tar"), [(k, samples[k]) for k in keys[:3]])
    webdataset.write_shard(os.path.join(root, "wds_x_0001.tar"), [(k, samples[k]) for k in keys[3:]])
    return samples


def _build(fmt, src, out, *extra) -> int:
    return build.main(["--format", fmt, "--src", str(src), "--out", str(out), *map(str, extra)])


def _by_id(out) -> dict:
    return {r["id"]: r for r in records.iter_records(str(out))}


def _summary(out) -> dict:
    return records.read_summary(str(out))


def test_seed_edit(tmp_path, capsys, caplog):
    files = make_seed_edit(tmp_path / "seed")
    assert _build("seed_edit", tmp_path / "seed", tmp_path / "out") == 0
    printed = capsys.readouterr()
    assert "written 5, skipped 7, filtered 0" in printed.out
    assert "missing image 1" in printed.out and "corrupt image 1" in printed.out
    got = _by_id(tmp_path / "out")
    single = "seed_edit:real_editing/annotations/split_0001.jsonl"
    multi = "seed_edit:multi_turn_editing/annotations/split_0001.jsonl:1"
    assert sorted(got) == sorted([f"{single}:1", f"{single}:6", f"{multi}/turn1", f"{multi}/turn2", f"{multi}/turn3"])
    a = got[f"{single}:1"]
    assert a["instruction"] == "make the sky purple" and a["source"] == files["a_src.jpg"]
    assert a["target"] == files["a_tgt.jpg"] and a["source_size"] == [24, 32] and a["mask"] is None
    assert got[f"{single}:6"]["instruction"] == "turn it into a painting"
    # multi-turn -> consecutive pairs, images found under the extra data/ level
    chain = [files["m"], files["m_edit1"], files["m_edit2"], files["m_edit3"]]
    for k, text in enumerate(("first", "second", "third"), 1):
        r = got[f"{multi}/turn{k}"]
        assert (r["source"], r["target"], r["instruction"]) == (chain[k - 1], chain[k], text)
    summary = _summary(tmp_path / "out")
    assert summary["num_records"] == 5
    assert summary["skipped"] == {"bad annotation": 2, "corrupt image": 1, "empty instruction": 1,
                                  "known corrupt range": 2, "missing image": 1}
    logged = [json.loads(line) for line in open(tmp_path / "out" / "skipped.jsonl")]
    assert {e["id"]: e["reason"] for e in logged}[f"{single}:2"] == "missing image"
    assert f"skip {single}:3: corrupt image" in caplog.text  # each skipped id is logged


def test_imgedit(tmp_path):
    files = make_imgedit(tmp_path / "ie")
    assert _build("imgedit", tmp_path / "ie", tmp_path / "out") == 0
    got = _by_id(tmp_path / "out")
    assert sorted(got) == ["imgedit:Parquet/action_part0.parquet:1", "imgedit:Parquet/add_part0.parquet:1",
                           "imgedit:Parquet/add_part0.parquet:2", "imgedit:Parquet/hybrid_part0.parquet:1"]
    hybrid = got["imgedit:Parquet/hybrid_part0.parquet:1"]
    assert hybrid["task"] == "hybrid" and hybrid["source"] == files["results_hybrid_part0/001/original.png"]
    action = got["imgedit:Parquet/action_part0.parquet:1"]
    assert action["target"] == files["results_action_part0/007/result.png"]
    add = got["imgedit:Parquet/add_part0.parquet:2"]
    assert (add["instruction"], add["task"], add["target"]) == ("add a cat", "add",
                                                                files["results_add_part0/002/result.png"])
    assert _summary(tmp_path / "out")["skipped"] == {"damaged archive": 1, "missing image": 1,
                                                     "not a one-to-one edit": 1}
    # multi-turn parquets are read on request only
    assert _build("imgedit", tmp_path / "ie", tmp_path / "out_mt", "--imgedit-multiturn") == 0
    got = _by_id(tmp_path / "out_mt")
    turn2 = got["imgedit:Parquet/content_memory_part0.parquet:1/turn2"]
    assert (turn2["source"], turn2["target"], turn2["instruction"]) == (files["mt/result_0.png"],
                                                                        files["mt/result_1.png"], "turn 2")
    assert len(got) == 6


def test_webdataset(tmp_path):
    samples = make_webdataset(tmp_path / "wds")
    assert _build("webdataset", tmp_path / "wds", tmp_path / "out") == 0
    got = _by_id(tmp_path / "out")
    assert sorted(got) == ["webdataset:wds_x_0000.tar:s000", "webdataset:wds_x_0001.tar:s004"]
    r = got["webdataset:wds_x_0001.tar:s004"]
    assert (r["source"], r["target"], r["instruction"]) == (samples["s004"]["src.jpg"], samples["s004"]["tgt.jpg"],
                                                            "edit number 4")
    assert _summary(tmp_path / "out")["skipped"] == {"corrupt image": 1, "empty instruction": 1, "missing image": 1}


def test_webdataset_damaged_shard_is_skipped(tmp_path):
    make_webdataset(tmp_path / "wds")
    path = tmp_path / "wds" / "wds_x_0001.tar"
    path.write_bytes(path.read_bytes()[:1200])  # truncated inside the second sample
    assert _build("webdataset", tmp_path / "wds", tmp_path / "out") == 0
    summary = _summary(tmp_path / "out")
    assert summary["skipped"].get("damaged archive") == 1 and summary["num_records"] >= 1


@pytest.mark.parametrize("jsonl", [False, True])
def test_filter_scores(tmp_path, capsys, jsonl):
    make_webdataset(tmp_path / "wds")
    scores = {"webdataset:wds_x_0000.tar:s000": 0.9, "webdataset:wds_x_0001.tar:s004": 0.2}
    score_file = tmp_path / ("scores.jsonl" if jsonl else "scores.json")
    score_file.write_text("".join(json.dumps({"id": k, "score": v}) + "\n" for k, v in scores.items()) if jsonl
                          else json.dumps(scores))
    assert _build("webdataset", tmp_path / "wds", tmp_path / "out", "--filter-scores", score_file,
                  "--min-score", 0.5) == 0
    assert "filtered 2" in capsys.readouterr().out
    assert sorted(_by_id(tmp_path / "out")) == ["webdataset:wds_x_0000.tar:s000"]
    summary = _summary(tmp_path / "out")
    # the filter runs before images are read: the unscored pair with a corrupt image counts as filtered
    assert summary["filtered"] == {"no score": 1, "score below threshold": 1}
    assert summary["skipped"] == {"empty instruction": 1, "missing image": 1}
    score_file.write_text(json.dumps({"webdataset:wds_x_0001.tar:s004": 0.7}) if not jsonl else
                          json.dumps({"id": "webdataset:wds_x_0001.tar:s004", "score": 0.7}) + "\n")
    assert _build("webdataset", tmp_path / "wds", tmp_path / "out2", "--filter-scores", score_file,
                  "--min-score", 0.5) == 0
    assert sorted(_by_id(tmp_path / "out2")) == ["webdataset:wds_x_0001.tar:s004"]
    assert _summary(tmp_path / "out2")["filtered"] == {"no score": 2}


def test_size_checks(tmp_path):
    make_seed_edit(tmp_path / "seed")
    assert _build("seed_edit", tmp_path / "seed", tmp_path / "out", "--min-side", 21) == 0
    summary = _summary(tmp_path / "out")
    assert summary["num_records"] == 2 and summary["skipped"]["image too small"] == 3
    assert _build("seed_edit", tmp_path / "seed", tmp_path / "out2", "--max-aspect", 1.2) == 0
    assert _summary(tmp_path / "out2")["skipped"]["extreme aspect ratio"] == 4  # the 24x32 sources (ratio 1.33)


class _Interrupt(Exception):
    pass


def test_resume_after_interruption(tmp_path, monkeypatch):
    make_seed_edit(tmp_path / "seed")
    _build("seed_edit", tmp_path / "seed", tmp_path / "clean", "--shard-size", 2)
    clean = _by_id(tmp_path / "clean")

    out = tmp_path / "out"
    real_to_record, calls = build.to_record, []

    def crashing(*args, **kwargs):
        calls.append(1)
        if len(calls) == 8:  # after some chunks were committed, inside an uncommitted one
            raise _Interrupt
        return real_to_record(*args, **kwargs)

    monkeypatch.setattr(build, "to_record", crashing)
    with pytest.raises(_Interrupt):
        _build("seed_edit", tmp_path / "seed", out, "--shard-size", 2)
    monkeypatch.setattr(build, "to_record", real_to_record)
    committed = sorted(os.listdir(out / "manifest"))
    assert committed and not (out / "dataset.json").exists()
    with pytest.raises(FileNotFoundError, match="not a finished"):
        records.open_records(str(out))
    # debris of a crash between a shard's rename and its manifest, and of a half-written shard
    (out / records.shard_name(99)).write_bytes(b"orphan")
    (out / "records-00100.array_record.tmp123").write_bytes(b"partial")

    assert _build("seed_edit", tmp_path / "seed", out, "--shard-size", 2) == 0
    got = list(records.iter_records(str(out)))
    ids = [r["id"] for r in got]
    assert len(ids) == len(set(ids)) == len(clean)
    assert {r["id"]: r for r in got}.keys() == clean.keys()
    for r in got:
        assert r == clean[r["id"]]
    assert not (out / records.shard_name(99)).exists()
    assert not any(".tmp" in name for name in os.listdir(out))
    assert _summary(out)["skipped"] == _summary(tmp_path / "clean")["skipped"]
    # a third run has nothing left to do
    assert _build("seed_edit", tmp_path / "seed", out) == 0
    assert [r["id"] for r in records.iter_records(str(out))] == ids


def test_num_caps_and_extends(tmp_path):
    assert build.main(["--format", "toy", "--out", str(tmp_path / "t"), "--num", "3"]) == 0
    assert _summary(tmp_path / "t")["num_records"] == 3
    assert build.main(["--format", "toy", "--out", str(tmp_path / "t"), "--num", "7"]) == 0
    ids = [r["id"] for r in records.iter_records(str(tmp_path / "t"))]
    assert ids == [f"toy:s0:64px:{i}" for i in range(7)]


def test_bad_input_exits_2(tmp_path, capsys):
    make_webdataset(tmp_path / "wds")
    with pytest.raises(SystemExit) as e:
        build.main(["--format", "seed_edit", "--out", str(tmp_path / "o")])  # no --src
    assert e.value.code == 2
    with pytest.raises(SystemExit) as e:
        build.main(["--format", "toy", "--out", str(tmp_path / "o")])  # no --num
    assert e.value.code == 2
    with pytest.raises(SystemExit) as e:
        _build("webdataset", tmp_path / "wds", tmp_path / "o", "--min-score", 1)  # without --filter-scores
    assert e.value.code == 2
    assert _build("seed_edit", tmp_path / "nowhere", tmp_path / "o") == 2
    assert "does not exist" in capsys.readouterr().err
    bad_scores = tmp_path / "bad.jsonl"
    bad_scores.write_text('{"id": "x"}\n')
    assert _build("webdataset", tmp_path / "wds", tmp_path / "o2", "--filter-scores", bad_scores,
                  "--min-score", 1) == 2
    assert _build("webdataset", tmp_path / "wds", tmp_path / "o3") == 0
    assert _build("webdataset", tmp_path / "wds", tmp_path / "o3", "--min-side", 5) == 2  # options changed
    assert "other options" in capsys.readouterr().err


def test_describe(tmp_path, capsys):
    make_seed_edit(tmp_path / "seed")
    _build("seed_edit", tmp_path / "seed", tmp_path / "out")
    capsys.readouterr()
    grid = tmp_path / "grid.png"
    assert describe.main([str(tmp_path / "out"), "--n", "3", "--grid", str(grid)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "5 records"
    shown = [line for line in lines if line.startswith("seed_edit:")]
    assert len(shown) == 3 and shown[0].endswith("/turn1: source 20x20, target 20x20: 'first'")
    with Image.open(grid) as im:
        assert im.size[1] == 3 * (describe.THUMB + describe.CAPTION + 4)
    assert describe.main([str(tmp_path / "seed")]) == 2


@pytest.mark.slow
def test_beam_build_matches_local_build(tmp_path, capsys):
    pytest.importorskip("apache_beam", reason="the beam extra is not installed")
    from data_pipelines import beam
    make_seed_edit(tmp_path / "seed")
    _build("seed_edit", tmp_path / "seed", tmp_path / "local")
    args = ["--format", "seed_edit", "--src", str(tmp_path / "seed"), "--out", str(tmp_path / "beam"),
            "--num-shards", "3", "--runner=DirectRunner"]
    assert beam.main(args) == 0
    assert "written 5, skipped 7" in capsys.readouterr().out
    local, got = _by_id(tmp_path / "local"), _by_id(tmp_path / "beam")
    assert got == local
    assert _summary(tmp_path / "beam")["skipped"] == _summary(tmp_path / "local")["skipped"]
    # resumable: a second run writes nothing new
    assert beam.main(args) == 0
    assert "written 0" in capsys.readouterr().out
    assert _by_id(tmp_path / "beam") == local
    # toy through Beam: --num is the dataset size
    assert beam.main(["--format", "toy", "--out", str(tmp_path / "toy"), "--num", "9", "--num-shards", "2"]) == 0
    assert sorted(_by_id(tmp_path / "toy")) == sorted(f"toy:s0:64px:{i}" for i in range(9))
