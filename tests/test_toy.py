"""The procedural toy editing dataset: determinism, exact masks, every op, instructions that match the edit."""
import re

import numpy as np
import pytest

from data_pipelines import toy
from data_pipelines.build import main as build_main
from data_pipelines.records import decode_mask, iter_records


def _object_pixels(img: np.ndarray, color: str) -> np.ndarray:
    return (img == np.array(toy.COLORS[color], np.uint8)).all(-1)


@pytest.mark.parametrize("size", [32, 64])
def test_render_pair_contract_and_determinism(size):
    a = toy.render_pair(7, 3, size)
    b = toy.render_pair(7, 3, size)
    assert set(a) == {"source", "target", "instruction", "mask", "op"}
    assert a["source"].shape == a["target"].shape == (size, size, 3)
    assert a["source"].dtype == a["target"].dtype == np.uint8
    assert a["mask"].shape == (size, size) and a["mask"].dtype == np.uint8 and set(np.unique(a["mask"])) <= {0, 1}
    for k in ("source", "target", "mask"):
        np.testing.assert_array_equal(a[k], b[k])
    assert a["instruction"] == b["instruction"] and a["op"] == b["op"]
    others = [toy.render_pair(8, 3, size), toy.render_pair(7, 8, size)]
    assert all(not np.array_equal(a["source"], o["source"]) for o in others)


def test_masks_are_exact_and_instructions_match_the_edit():
    size, ops = 64, []
    for index in range(60):
        p = toy.render_pair(1, index, size)
        src, tgt, mask, text = p["source"], p["target"], p["mask"].astype(bool), p["instruction"]
        ops.append(p["op"])
        changed = (src != tgt).any(-1)
        assert changed.any(), (index, text)
        np.testing.assert_array_equal(src[~mask], tgt[~mask])  # nothing changes outside the mask
        color, shape = re.search(r"(\w+) (circle|square|triangle)", text).groups()
        assert color in toy.COLORS, text
        old, new = _object_pixels(src, color) & mask, _object_pixels(tgt, color) & mask
        if p["op"] == "recolor":
            new_color = text.split()[-1]
            assert new_color in toy.COLORS and new_color != color
            np.testing.assert_array_equal(mask, changed)
            np.testing.assert_array_equal(mask, old)
            np.testing.assert_array_equal(mask, _object_pixels(tgt, new_color) & mask)
        elif p["op"] == "remove":
            np.testing.assert_array_equal(mask, changed)
            np.testing.assert_array_equal(mask, old)
            assert not new.any()
        elif p["op"] == "add":
            np.testing.assert_array_equal(mask, changed)
            np.testing.assert_array_equal(mask, new)
            assert not old.any()
            position = text.split(" at the ")[-1]
            row, col = toy.POSITIONS[position]
            ys, xs = np.nonzero(mask)  # the centroid lies in (or at the edge of) the named third of the image
            assert abs(ys.mean() / size * 3 - (row + 0.5)) <= 0.85 and abs(xs.mean() / size * 3 - (col + 0.5)) <= 0.85
        else:  # move / resize: the mask is the union of the old and new footprints
            np.testing.assert_array_equal(mask, old | new)
            assert not (changed & ~mask).any()
            if p["op"] == "move":
                direction = next(d for d in toy.DIRECTIONS if text.endswith(d))
                dy, dx = toy.DIRECTIONS[direction]
                shift = int(toy.MOVE * size)
                np.testing.assert_array_equal(np.roll(old, (dy * shift, dx * shift), axis=(0, 1)), new)
            else:
                bigger = text.endswith("bigger") or text.startswith("enlarge")
                assert (new.sum() > old.sum()) == bigger, text
    assert set(ops) == set(toy.OPS)
    assert min(ops.count(op) for op in toy.OPS) >= 10


def test_small_vocabulary():
    words = {w for i in range(300) for w in toy.render_pair(0, i, 64)["instruction"].split()}
    assert len(words) <= 45, sorted(words)


def test_bad_arguments():
    with pytest.raises(ValueError, match="size"):
        toy.render_pair(0, 0, 8)
    with pytest.raises(ValueError, match=">= 0"):
        toy.render_pair(-1, 0, 64)


def test_toy_build_matches_render_pair(tmp_path, capsys):
    out = tmp_path / "toy"
    assert build_main(["--format", "toy", "--out", str(out), "--num", "12", "--size", "32", "--seed", "5",
                       "--shard-size", "5"]) == 0
    assert "written 12" in capsys.readouterr().out
    records = list(iter_records(str(out)))
    assert [r["id"] for r in records] == [f"toy:s5:32px:{i}" for i in range(12)]
    for i, r in enumerate(records):
        p = toy.render_pair(5, i, 32)
        assert r["instruction"] == p["instruction"] and r["task"] == p["op"]
        assert r["source_size"] == r["target_size"] == [32, 32]
        np.testing.assert_array_equal(decode_mask(r["mask"]), p["mask"])
