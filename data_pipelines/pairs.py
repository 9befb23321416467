"""Your own before / after pairs: a JSONL file of paths, or parquet files in the Hugging Face datasets layout.

jsonl    `src` is a JSONL file (local or gs://) of rows {"source": path, "target": path, "instruction": text
         [, "mask": path]}; relative paths are relative to the file's folder. A mask is a grayscale image of the
         target's size, nonzero = edited pixel (stored as the records' 0/1 PNG).
         Ids: "jsonl:<file name>:<line>" (lines from 1). Unit: the file.
parquet  `src` is a folder (local or gs://) searched recursively for *.parquet (the layout `datasets` pushes to the
         Hub: data/train-00000-of-0000N.parquet). Image columns hold encoded bytes, or the HF Image struct
         {"bytes", "path"} (a path without bytes resolves relative to the parquet's folder); the instruction column
         holds text. Column names default to source / target / instruction [/ mask]; `columns` maps them to the
         dataset's own, e.g. {"source": "input_image", "target": "edited_image", "instruction": "edit_prompt"}
         (`--columns source=input_image,target=edited_image,instruction=edit_prompt`).
         Ids: "parquet:<file relative to src>:<row>" (rows from 1). Unit: one parquet file. Needs pyarrow.
Bad rows (invalid JSON, missing fields, missing or corrupt images) are counted skips, as for every reader.
"""
import io
import json
from typing import Iterator

import numpy as np
from etils import epath
from PIL import Image

from data_pipelines.records import BAD_ANNOTATION, DAMAGED_ARCHIVE, MISSING_IMAGE, RawPair, Skip, encode_png
from varedit_jax import storage

ROLES = ("source", "target", "instruction", "mask")
REQUIRED = ROLES[:3]


def parse_columns(text: str | None) -> dict[str, str]:
    """"source=a,target=b,instruction=c[,mask=d]" -> {role: column}; unnamed roles keep their own name."""
    columns = {role: role for role in ROLES}
    for part in (text or "").split(","):
        if not part.strip():
            continue
        role, sep, column = (s.strip() for s in part.partition("="))
        if not sep or role not in ROLES or not column:
            raise ValueError(f"--columns: expected ROLE=COLUMN with ROLE in {', '.join(ROLES)}, got {part!r}")
        columns[role] = column
    return columns


def _read(path: epath.Path) -> bytes | None:
    return path.read_bytes() if path.is_file() else None


def mask_png(data: bytes) -> bytes:
    """A user mask (any image, nonzero = edited) -> the records' (h, w) 0/1 PNG; raises ValueError if it does not
    decode."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            mask = np.asarray(im.convert("L")) > 0
    except Exception as e:  # PIL raises many types for bad data
        raise ValueError(f"mask does not decode: {e}") from e
    return encode_png(mask.astype(np.uint8))


def _pair(rid: str, instruction, images: dict[str, bytes | None], mask: bytes | None) -> RawPair | Skip:
    missing = [role for role, data in images.items() if data is None]
    if missing:
        return Skip(rid, MISSING_IMAGE, f"no {' / '.join(missing)} image")
    if mask is not None:
        try:
            mask = mask_png(mask)
        except ValueError as e:
            return Skip(rid, BAD_ANNOTATION, str(e))
    return RawPair(rid, instruction if isinstance(instruction, str) else "", images["source"], images["target"],
                   mask=mask)


class JsonlReader:
    """Pairs listed in one JSONL file (module docstring)."""

    def __init__(self, src: str):
        self.path = storage.path(src)
        if not self.path.is_file():
            raise FileNotFoundError(f"pairs file {src} does not exist")

    def units(self) -> list[str]:
        return [self.path.name]

    def read(self, unit: str) -> Iterator[RawPair | Skip]:
        folder = self.path.parent
        for line_no, line in enumerate(self.path.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            rid = f"jsonl:{unit}:{line_no}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                yield Skip(rid, BAD_ANNOTATION, f"invalid JSON: {e}")
                continue
            if not isinstance(row, dict) or any(not isinstance(row.get(k), str) for k in ("source", "target")):
                yield Skip(rid, BAD_ANNOTATION, 'expected {"source": path, "target": path, "instruction": text}')
                continue
            images = {role: _read(folder / row[role]) for role in ("source", "target")}
            mask = None
            if row.get("mask"):
                mask = _read(folder / row["mask"])
                if mask is None:
                    yield Skip(rid, MISSING_IMAGE, f"no mask {row['mask']}")
                    continue
            yield _pair(rid, row.get("instruction"), images, mask)


class ParquetReader:
    """Pairs in parquet files of the HF datasets layout (module docstring)."""

    def __init__(self, src: str, columns: dict[str, str] | None = None):
        self.root = storage.path(src)
        if not self.root.is_dir():
            raise FileNotFoundError(f"parquet folder {src} does not exist")
        self.columns = columns or parse_columns(None)

    def units(self) -> list[str]:
        files = sorted(str((folder / name).relative_to(self.root)) for folder, _, names in self.root.walk()
                       for name in names if name.endswith(".parquet"))
        if not files:
            raise FileNotFoundError(f"no *.parquet below {self.root}")
        return files

    def _image(self, cell, folder: epath.Path) -> bytes | None:
        if isinstance(cell, dict):
            if cell.get("bytes"):
                return cell["bytes"]
            return _read(folder / cell["path"]) if cell.get("path") else None
        return cell if isinstance(cell, bytes) and cell else None

    def read(self, unit: str) -> Iterator[RawPair | Skip]:
        try:
            import pyarrow
            import pyarrow.parquet as pq
        except ImportError as e:
            raise ImportError("reading parquet pairs needs pyarrow: pip install 'varedit_jax[data]'") from e
        path = self.root / unit
        row_no = 0
        try:
            with path.open("rb") as f:
                shard = pq.ParquetFile(f)
                names = set(shard.schema_arrow.names)
                wanted = [self.columns[r] for r in REQUIRED]
                missing = [c for c in wanted if c not in names]
                if missing:
                    raise ValueError(f"{path}: columns {missing} not found (has {sorted(names)}); map them with "
                                     "--columns source=...,target=...,instruction=...")
                read = wanted + ([self.columns["mask"]] if self.columns["mask"] in names else [])
                for batch in shard.iter_batches(batch_size=64, columns=read):
                    for row in batch.to_pylist():
                        row_no += 1
                        images = {role: self._image(row[self.columns[role]], path.parent)
                                  for role in ("source", "target")}
                        mask = self._image(row.get(self.columns["mask"]), path.parent)
                        yield _pair(f"parquet:{unit}:{row_no}", row[self.columns["instruction"]], images, mask)
        except (OSError, pyarrow.ArrowException) as e:
            yield Skip(f"parquet:{unit}", DAMAGED_ARCHIVE, f"unreadable parquet after row {row_no}: {e}")
