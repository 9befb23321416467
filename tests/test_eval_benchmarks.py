"""Benchmark loaders (data_pipelines/benchmarks.py) on tiny synthetic copies written in the real layouts."""
import io
import json
import logging
import os

import numpy as np
import pytest
from PIL import Image

from data_pipelines import benchmarks as bm

pa = pytest.importorskip("pyarrow", reason="the EMU-Edit / GEdit-Bench loaders need the data extra (pyarrow)")
import pyarrow.parquet as pq  # noqa: E402


def _png(value: int, size=(12, 10)) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full(size + (3,), value, np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


IMAGE_TYPE = pa.struct([("bytes", pa.binary()), ("path", pa.string())])


def _emu_table(rows):
    return pa.table({
        "instruction": pa.array([r[0] for r in rows], pa.string()),
        "image": pa.array([{"bytes": r[1], "path": None} for r in rows], IMAGE_TYPE),
        "task": pa.array([r[2] for r in rows], pa.string()),
        "split": pa.array(["test"] * len(rows), pa.string()),
        "idx": pa.array(list(range(len(rows))), pa.int64()),
        "hash": pa.array([f"h{i}" for i in range(len(rows))], pa.string()),
        "input_caption": pa.array([f"in {i}" for i in range(len(rows))], pa.string()),
        "output_caption": pa.array([f"out {i}" for i in range(len(rows))], pa.string())})


def test_emu_edit_reads_shards_counts_tasks_and_skips(tmp_path, caplog):
    os.makedirs(tmp_path / "data")
    rows = [("add a hat", _png(10), "add"), ("make it night", _png(20), "global"), ("", _png(30), "add"),
            ("remove the dog", b"not an image", "remove"), ("paint it", None, "texture"),
            ("add a cat", _png(40), "add")]
    pq.write_table(_emu_table(rows[:3]), tmp_path / "data" / "test-00000-of-00002.parquet")
    pq.write_table(_emu_table(rows[3:]), tmp_path / "data" / "test-00001-of-00002.parquet")
    pq.write_table(_emu_table(rows[:1]), tmp_path / "data" / "validation-00000-of-00001.parquet")
    skips = bm.Skips()
    with caplog.at_level(logging.WARNING):
        samples = list(bm.emu_edit(tmp_path, "test", skips))
    assert [s.instruction for s in samples] == ["add a hat", "make it night", "add a cat"]
    assert samples[0].source.shape == (12, 10, 3) and samples[0].source[0, 0, 0] == 10
    assert samples[1].source_caption == "in 1" and samples[1].target_caption == "out 1" and samples[1].mask is None
    assert bm.category_counts(samples) == {"add": 2, "global": 1}
    assert dict(skips.counts) == {bm.EMPTY_INSTRUCTION: 1, bm.CORRUPT_IMAGE: 1, bm.MISSING_IMAGE: 1}
    assert len(skips) == 3 and "1 corrupt image" in skips.summary()
    assert "expected 3589" in caplog.text  # a 6-row "test" split is reported
    assert len(list(bm.emu_edit(tmp_path, "validation"))) == 1


def test_emu_edit_warns_about_the_swapped_generations_splits(tmp_path, caplog):
    os.makedirs(tmp_path / "data")
    table = _emu_table([("add a hat", _png(10), "add")] * bm.EMU_SPLIT_SIZES["validation"])
    table = table.append_column("edited_image", table.column("image"))  # the generations repo's extra column
    pq.write_table(table, tmp_path / "data" / "test-00000-of-00001.parquet")
    with caplog.at_level(logging.WARNING):
        first = next(bm.emu_edit(tmp_path, "test"))
    assert first.instruction == "add a hat"
    assert "split names look swapped" in caplog.text and "edited_image" in caplog.text


def test_emu_edit_bad_input(tmp_path):
    with pytest.raises(FileNotFoundError):
        list(bm.emu_edit(tmp_path))
    with pytest.raises(ValueError, match="split"):
        list(bm.emu_edit(tmp_path, "train"))
    os.makedirs(tmp_path / "data")
    pq.write_table(pa.table({"instruction": ["x"]}), tmp_path / "data" / "test-0.parquet")
    with pytest.raises(ValueError, match="not an EMU-Edit shard"):
        list(bm.emu_edit(tmp_path))
    (tmp_path / "data" / "test-0.parquet").write_bytes(b"PAR1 truncated")
    with pytest.raises(ValueError, match="cannot read parquet"):
        list(bm.emu_edit(tmp_path))


def test_pie_mask_decoding_runs_clipping_and_border():
    mask = bm.decode_pie_mask([5 * 8 + 2, 3, 60, 100], shape=(8, 8))
    expected = np.zeros((8, 8), np.uint8)
    expected.reshape(-1)[42:45] = 1
    expected.reshape(-1)[60:] = 1  # run clipped at the end of the grid
    expected[0, :] = expected[-1, :] = expected[:, 0] = expected[:, -1] = 1
    np.testing.assert_array_equal(mask, expected)
    empty = bm.decode_pie_mask([], shape=(6, 6))
    assert empty.sum() == 6 * 6 - 4 * 4  # only the forced border
    for bad in ([1, 2, 3], [-1, 2], [100, 2], [1.5, 2], "0 4"):
        with pytest.raises(ValueError):
            bm.decode_pie_mask(bad, shape=(8, 8))
    assert bm.decode_pie_mask([0, 1]).shape == bm.PIE_MASK_SHAPE


def test_pie_bench_loader(tmp_path):
    root = tmp_path / "data"
    folder = root / "annotation_images" / "1_change_object_80" / "1_artificial"
    os.makedirs(folder)
    image = np.random.default_rng(0).integers(0, 256, (512, 512, 3), dtype=np.uint8)
    Image.fromarray(image).save(folder / "a.jpg", quality=95)
    Image.fromarray(image[:256]).save(folder / "small.png")
    (folder / "broken.jpg").write_bytes(b"\xff\xd8 not really")
    entry = lambda path, **kw: {  # noqa: E731
        "image_path": f"1_change_object_80/1_artificial/{path}", "original_prompt": "a [cat] on a mat",
        "editing_prompt": "a [dog] on a mat", "editing_instruction": "turn the cat into a dog",
        "editing_type_id": "1", "blended_word": "cat dog", "mask": [512 * 100 + 100, 50], **kw}
    mapping = {"000000000000": entry("a.jpg"), "000000000001": entry("missing.jpg"),
               "000000000002": entry("broken.jpg"), "000000000003": entry("small.png"),
               "000000000004": entry("a.jpg", mask=[1, 2, 3]), "000000000005": entry("a.jpg", editing_instruction=" "),
               "000000000006": {"image_path": "x.jpg"}}
    (root / "mapping_file.json").write_text(json.dumps(mapping))
    skips = bm.Skips()
    samples = list(bm.pie_bench(tmp_path, skips))  # the folder above data/ works too
    assert len(samples) == 1
    s = samples[0]
    assert s.id == "pie_bench:000000000000" and s.instruction == "turn the cat into a dog"
    assert s.source_caption == "a cat on a mat" and s.target_caption == "a dog on a mat"
    assert s.category == "change_object" and s.extra["editing_type_id"] == "1"
    assert s.source.shape == (512, 512, 3) and s.mask.shape == (512, 512)
    assert s.mask[100, 100:150].all() and not s.mask[100, 150] and s.mask[0].all() and s.mask[:, -1].all()
    assert s.mask.sum() == 50 + 4 * 511
    assert dict(skips.counts) == {bm.MISSING_IMAGE: 1, bm.CORRUPT_IMAGE: 1, bm.SIZE_MISMATCH: 1,
                                  bm.BAD_ANNOTATION: 2, bm.EMPTY_INSTRUCTION: 1}
    with pytest.raises(FileNotFoundError):
        list(bm.pie_bench(tmp_path / "nowhere"))


def _gedit_table(rows):
    return pa.table({
        "task_type": pa.array([r[0] for r in rows]), "key": pa.array([r[1] for r in rows]),
        "instruction": pa.array([r[2] for r in rows]), "instruction_language": pa.array([r[3] for r in rows]),
        "input_image": pa.array([{"bytes": _png(1), "path": None} for _ in rows], IMAGE_TYPE),
        "input_image_raw": pa.array([{"bytes": r[4], "path": None} for r in rows], IMAGE_TYPE),
        "Intersection_exist": pa.array([True] * len(rows))})


@pytest.mark.parametrize("writer", ["stream", "file"])
def test_gedit_bench_loader(tmp_path, writer):
    rows = [("subject-add", "k1", "add a bird", "en", _png(50)), ("subject-add", "k1", "添加一只鸟", "cn", _png(50)),
            ("color_alter", "k2", "make it red", "en", b"junk"), ("color_alter", "k3", "", "en", _png(5))]
    table = _gedit_table(rows)
    os.makedirs(tmp_path / "train")
    path = str(tmp_path / "train" / "data-00000-of-00001.arrow")
    opener = pa.ipc.new_stream if writer == "stream" else pa.ipc.new_file
    with opener(path, table.schema) as w:
        w.write_table(table)
    skips = bm.Skips()
    samples = list(bm.gedit_bench(tmp_path, skips=skips))
    assert [s.id for s in samples] == ["gedit_bench:subject-add/en/k1", "gedit_bench:subject-add/cn/k1"]
    assert samples[0].source[0, 0, 0] == 50  # input_image_raw preferred over input_image
    assert samples[0].extra == {"key": "k1", "language": "en", "intersection_exist": True}
    assert dict(skips.counts) == {bm.CORRUPT_IMAGE: 1, bm.EMPTY_INSTRUCTION: 1}
    assert [s.instruction for s in bm.gedit_bench(tmp_path, language="cn")] == ["添加一只鸟"]


def test_gedit_bench_bad_files(tmp_path):
    with pytest.raises(FileNotFoundError):
        list(bm.gedit_bench(tmp_path))
    (tmp_path / "x.arrow").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="Arrow"):
        list(bm.gedit_bench(tmp_path))
