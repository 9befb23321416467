"""Result tables and image grids (varedit_jax/eval/report.py)."""
import csv
import json

import numpy as np
import pytest
from PIL import Image

from data_pipelines.toy import render_pair
from varedit_jax.eval import report

ROWS = [dict(strategy="full", input_length=1042, balance=np.float64(4.96712), success=5.775, note="a|b"),
        dict(strategy="sar", input_length=777, balance=float("nan"), success=np.float32(6.072)),
        dict(strategy="copy_source", balance=0.0, success=float("inf"))]


def test_markdown_table():
    md = report.markdown_table(ROWS, digits=2)
    lines = md.strip().splitlines()
    assert lines[0] == "| strategy | input_length | balance | success | note |"
    assert lines[1] == "|:---|---:|---:|---:|:---|"  # numeric columns right-aligned (missing cells allowed)
    assert lines[2] == "| full | 1042 | 4.97 | 5.78 | a\\|b |"  # pipes escaped
    assert lines[3] == "| sar | 777 | nan | 6.07 |  |"
    assert lines[4] == "| copy_source |  | 0.00 | inf |  |"
    assert report.markdown_table(ROWS, columns=["balance", "strategy"]).splitlines()[0] == "| balance | strategy |"


def test_write_table_formats(tmp_path):
    paths = report.write_table(ROWS, tmp_path / "out", "table3", title="Ablation", digits=3)
    assert sorted(paths) == ["csv", "json", "md"] and all(p.is_file() for p in paths.values())
    assert paths["md"].read_text().startswith("# Ablation\n\n| strategy |")
    with open(paths["csv"], newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["strategy", "input_length", "balance", "success", "note"]
    assert rows[1] == ["full", "1042", "4.967", "5.775", "a|b"] and rows[2][2] == "nan"
    data = json.loads(paths["json"].read_text())  # strict JSON: NaN / inf become null
    assert data["title"] == "Ablation" and data["columns"][0] == "strategy"
    assert data["rows"][0]["balance"] == pytest.approx(4.96712) and data["rows"][1]["balance"] is None
    assert data["rows"][2]["success"] is None and isinstance(data["rows"][1]["success"], float)


def test_image_grid_layout(tmp_path):
    pairs = [render_pair(0, i, 32) for i in range(3)]
    sources = [p["source"] for p in pairs]
    outputs = [p["target"].astype(np.float32) / 127.5 - 1.0 for p in pairs]  # float [-1, 1] works too
    long_text = "make the red circle blue " * 8
    instructions = [pairs[0]["instruction"], long_text, pairs[2]["instruction"]]
    grid = report.image_grid(sources, instructions, outputs, cell=64, title="sar")
    with_targets = report.image_grid(sources, instructions, outputs, targets=[p["target"] for p in pairs], cell=64)
    assert with_targets.width - grid.width == 64 + report.PAD  # one more column
    short = report.image_grid(sources, [pairs[0]["instruction"]] * 3, outputs, cell=64, title="sar")
    assert grid.height > short.height  # the long instruction wraps onto more lines
    arr = np.asarray(grid)
    # The first source tile sits at (PAD, top): its top-left pixel equals the (nearest-upscaled) source pixel.
    top = 2 * (report.FONT_SIZE + 4) + report.PAD
    np.testing.assert_array_equal(arr[top, report.PAD], sources[0][0, 0])
    np.testing.assert_array_equal(arr[top + 63, report.PAD + 64 + report.PAD + 63], pairs[0]["target"][31, 31])
    path = report.save_grid(tmp_path / "grids" / "sar.png", sources, instructions, outputs, cell=64)
    assert Image.open(path).size == (grid.width, grid.height - report.FONT_SIZE - 4)  # no title line
    with pytest.raises(ValueError, match="same length"):
        report.image_grid(sources, instructions[:2], outputs)
    with pytest.raises(ValueError, match="at least one"):
        report.image_grid([], [], [])
