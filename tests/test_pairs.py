"""Your own pairs (data_pipelines/pairs.py): `build --format jsonl` (paths relative to the file, masks) and
`--format parquet` (HF datasets layout: bytes columns or {"bytes", "path"} structs, `--columns`), with bad rows."""
import io
import json

import numpy as np
import pytest
from PIL import Image

from data_pipelines import build, pairs, records

pa = pytest.importorskip("pyarrow", reason="parquet pairs need the data extra (pyarrow)")
import pyarrow.parquet as pq  # noqa: E402


def _png(seed, size=(20, 24), mode="RGB") -> bytes:
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 256, size + ((3,) if mode == "RGB" else ()), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def _records(out) -> dict:
    return {r["id"]: r for r in records.iter_records(str(out))}


def test_jsonl_pairs_relative_paths_masks_and_bad_rows(tmp_path, capsys):
    folder = tmp_path / "mine"
    (folder / "img").mkdir(parents=True)
    for name, seed in (("a.png", 1), ("b.png", 2), ("c.png", 3)):
        (folder / "img" / name).write_bytes(_png(seed))
    mask = np.zeros((20, 24), np.uint8)
    mask[5:10, 2:8] = 255
    Image.fromarray(mask).save(folder / "img" / "m.png")
    rows = [{"source": "img/a.png", "target": "img/b.png", "instruction": "make it blue", "mask": "img/m.png"},
            {"source": "img/b.png", "target": "img/c.png", "instruction": " add a sun "},
            {"source": "img/a.png", "target": "img/none.png", "instruction": "x"},
            {"source": "img/a.png", "instruction": "no target"}, "{broken",
            {"source": "img/a.png", "target": "img/c.png", "instruction": ""}]
    (folder / "pairs.jsonl").write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    assert build.main(["--format", "jsonl", "--src", str(folder / "pairs.jsonl"), "--out", str(tmp_path / "o")]) == 0
    got = _records(tmp_path / "o")
    assert list(got) == ["jsonl:pairs.jsonl:1", "jsonl:pairs.jsonl:2"]
    first = got["jsonl:pairs.jsonl:1"]
    assert first["source"] == (folder / "img" / "a.png").read_bytes() and first["instruction"] == "make it blue"
    np.testing.assert_array_equal(records.decode_mask(first["mask"]), (mask > 0).astype(np.uint8))
    assert got["jsonl:pairs.jsonl:2"]["instruction"] == "add a sun" and got["jsonl:pairs.jsonl:2"]["mask"] is None
    assert records.read_summary(str(tmp_path / "o"))["skipped"] == {
        records.MISSING_IMAGE: 1, records.BAD_ANNOTATION: 2, records.EMPTY_INSTRUCTION: 1}
    assert "written 2, skipped 4" in capsys.readouterr().out


def test_parquet_pairs_bytes_structs_and_column_mapping(tmp_path, capsys):
    root = tmp_path / "hf" / "data"
    root.mkdir(parents=True)
    (root / "side.png").write_bytes(_png(7))
    image = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    pq.write_table(pa.table({
        "input_image": pa.array([{"bytes": _png(1), "path": None}, {"bytes": None, "path": "side.png"},
                                 {"bytes": None, "path": None}], image),
        "edited_image": pa.array([{"bytes": _png(2), "path": None}, {"bytes": _png(3), "path": None},
                                  {"bytes": _png(4), "path": None}], image),
        "edit_prompt": ["make it red", "add a tree", "lost"]}), root / "train-00000-of-00002.parquet")
    pq.write_table(pa.table({"input_image": [_png(5)], "edited_image": [b"not an image"],
                             "edit_prompt": ["broken"]}), root / "train-00001-of-00002.parquet")
    flags = ["--format", "parquet", "--src", str(tmp_path / "hf"), "--out", str(tmp_path / "o"),
             "--columns", "source=input_image,target=edited_image,instruction=edit_prompt"]
    assert build.main(flags) == 0
    got = _records(tmp_path / "o")
    assert [r["instruction"] for r in got.values()] == ["make it red", "add a tree"]
    assert got["parquet:data/train-00000-of-00002.parquet:2"]["source"] == (root / "side.png").read_bytes()
    assert records.read_summary(str(tmp_path / "o"))["skipped"] == {records.MISSING_IMAGE: 1,
                                                                     records.CORRUPT_IMAGE: 1}
    assert build.main(["--format", "parquet", "--src", str(tmp_path / "hf"), "--out", str(tmp_path / "o2")]) == 2
    assert "columns ['source', 'target', 'instruction'] not found" in capsys.readouterr().err
    with pytest.raises(ValueError, match="ROLE=COLUMN"):
        pairs.parse_columns("source=a,colour=b")
    with pytest.raises(SystemExit):
        build.main(["--format", "jsonl", "--src", "x", "--out", str(tmp_path / "o3"), "--columns", "source=a"])
