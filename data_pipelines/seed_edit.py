"""SEED-Data-Edit (AILab-CVC, CC-BY-NC-4.0) as extracted by users: annotation JSONL files + image folders.

`src` is a part folder (`auto_editing/openimages`, `auto_editing/unsplash`, `real_editing`, `multi_turn_editing`)
or any folder above parts: every `*.jsonl` below a folder named `annotations*` (incl. `annotations_GPT4V`) is read,
and its image paths resolve against the sibling `images/` folder of that annotations folder, also under an extra
`data/` level (some extracted multi-turn trees have it), or against the part folder itself.

Records, one JSON object per line (keys vary between files; every key is optional here):
- single-turn (Part 1, 2): `source_image`, `target_image`, `instruction` (+ captions, `instruction_ori`, ...).
- multi-turn (Part 3): `source_image`, `instruction_k`, `edit_image_k` for k = 1..N (N up to 6). Decomposed into
  consecutive pairs: pair k = (image of the previous present turn, or the source; edit_image_k; instruction_k).
Ids: "seed_edit:<annotation path relative to src>:<line>" (+ "/turn<k>" for multi-turn pairs).
Multi-turn sequences under the prefixes reported as corrupt (`KNOWN_CORRUPT_PREFIXES`) are skipped.
"""
import glob
import json
import os
import re
from typing import Iterator

from data_pipelines.records import BAD_ANNOTATION, KNOWN_CORRUPT, RawPair, Skip

FORMAT = "seed_edit"
# Multi-turn sequences dropped by other loaders "due to corrupted image files" (data_and_eval.md §7).
KNOWN_CORRUPT_PREFIXES = tuple(f"20240330_315P_1323turns/Data/{n}" for n in range(208, 213))
_TURN_KEY = re.compile(r"^(instruction|edit_image)_(\d+)$")


class Reader:
    """SEED-Data-Edit pairs below `src`; a unit is one annotation file."""

    def __init__(self, src: str):
        if not os.path.isdir(src):
            raise FileNotFoundError(f"SEED-Data-Edit folder {src} does not exist")
        self.src = src

    def units(self) -> list[str]:
        files = sorted(glob.glob(os.path.join(self.src, "**", "annotations*", "*.jsonl"), recursive=True))
        if not files:
            raise FileNotFoundError(f"no annotations*/*.jsonl below {self.src}")
        return [os.path.relpath(f, self.src) for f in files]

    def read(self, unit: str) -> Iterator[RawPair | Skip]:
        path = os.path.join(self.src, unit)
        part = os.path.dirname(os.path.dirname(path))
        roots = (os.path.join(part, "images"), os.path.join(part, "images", "data"), part)
        try:
            with open(path, "rb") as f:
                lines = f.read().splitlines()
        except OSError as e:
            yield Skip(f"{FORMAT}:{unit}", BAD_ANNOTATION, f"unreadable annotation file: {e}")
            return
        for line_no, line in enumerate(lines, 1):
            if not line.strip():
                continue
            rid = f"{FORMAT}:{unit}:{line_no}"
            try:
                row = json.loads(line.decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                yield Skip(rid, BAD_ANNOTATION, f"invalid JSON: {e}")
                continue
            if not isinstance(row, dict):
                yield Skip(rid, BAD_ANNOTATION, "not a JSON object")
            else:
                yield from _pairs(rid, row, roots)


def _resolve(rel, roots: tuple[str, ...]) -> str:
    """The first existing file `root/rel`; the first candidate (reported as missing) when none exists."""
    rel = str(rel).lstrip("/")
    candidates = [os.path.join(root, rel) for root in roots]
    return next((c for c in candidates if os.path.isfile(c)), candidates[0])


def _pairs(rid: str, row: dict, roots: tuple[str, ...]) -> Iterator[RawPair | Skip]:
    if "source_image" not in row:
        yield Skip(rid, BAD_ANNOTATION, "no source_image")
        return
    if "target_image" in row:
        yield RawPair(rid, str(row.get("instruction") or ""), _resolve(row["source_image"], roots),
                      _resolve(row["target_image"], roots))
        return
    turns = sorted({int(m.group(2)) for k in row if (m := _TURN_KEY.match(k))})
    if not turns:
        yield Skip(rid, BAD_ANNOTATION, "neither target_image nor instruction_k/edit_image_k")
        return
    if str(row["source_image"]).lstrip("/").startswith(KNOWN_CORRUPT_PREFIXES):
        for k in turns:
            yield Skip(f"{rid}/turn{k}", KNOWN_CORRUPT, str(row["source_image"]))
        return
    previous = row["source_image"]
    for k in turns:
        edit = row.get(f"edit_image_{k}")
        if not edit:
            yield Skip(f"{rid}/turn{k}", BAD_ANNOTATION, f"no edit_image_{k}")
            continue
        yield RawPair(f"{rid}/turn{k}", str(row.get(f"instruction_{k}") or ""), _resolve(previous, roots),
                      _resolve(edit, roots))
        previous = edit
