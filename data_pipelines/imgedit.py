"""ImgEdit (PKU-YuanGroup, HF `sysuyy/ImgEdit`) as extracted by users: `Parquet/*.parquet` + image trees.

`src` is the dataset root: parquet files anywhere below it (normally `Parquet/<task>_part<k>.parquet`), images in
the extracted `Singleturn/` (and `Multiturn/`) trees. Needs pyarrow (the `data` extra).

Parquet schemas:
- single-turn: `input_images: list<string>`, `output_images: list<string>`, `prompt: string`. Some files nest the
  path lists one level deeper (`[['...']]`): flattened. Rows with other than one input and one output image
  (`reference_*` tasks) are skipped (NOT_ONE_TO_ONE).
- multi-turn: `data: list<struct<input_images, output_images, prompt>>`, one struct per turn. The paper trains on
  single-turn data only, so these files are read only with `include_multiturn=True`.
Paths resolve against `src`, `src/Singleturn`, `src/Multiturn`; the `results_compose` prefix of the hybrid parquets
is rewritten to the archives' `results_hybrid`; paths that still do not resolve (e.g. basename-only rows of some
`action_*` parquets) are looked up by their trailing path components in an index of the image trees, used only when
the match is unique.
Ids: "imgedit:<parquet path relative to src>:<row>" (rows from 1; + "/turn<k>" for multi-turn turns).
Record task: the parquet stem without `_part<k>` (e.g. "add", "remove", "hybrid").
"""
import glob
import logging
import os
import re
from typing import Iterator

from data_pipelines.records import BAD_ANNOTATION, DAMAGED_ARCHIVE, NOT_ONE_TO_ONE, RawPair, Skip

FORMAT = "imgedit"
_PREFIX_FIXES = (("results_compose", "results_hybrid"),)
_IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".webp")
log = logging.getLogger("data_pipelines")


def _pyarrow():
    """(pyarrow, pyarrow.parquet)."""
    try:
        import pyarrow
        import pyarrow.parquet
    except ImportError as e:
        raise ImportError("reading ImgEdit needs pyarrow: pip install 'varedit_jax[data]'") from e
    return pyarrow, pyarrow.parquet


def _flatten(value) -> list[str]:
    """Paths of a (possibly nested) list of paths; None -> []."""
    if value is None:
        return []
    if isinstance(value, (list, tuple)):
        return [p for v in value for p in _flatten(v)]
    return [str(value)]


def task_name(parquet_path: str) -> str:
    stem = os.path.splitext(os.path.basename(parquet_path))[0]
    return re.sub(r"_part\d+$", "", stem)


class Reader:
    """ImgEdit pairs below `src`; a unit is one parquet file."""

    def __init__(self, src: str, include_multiturn: bool = False):
        if not os.path.isdir(src):
            raise FileNotFoundError(f"ImgEdit folder {src} does not exist")
        self.src, self.include_multiturn = src, include_multiturn
        self.roots = (src, os.path.join(src, "Singleturn"), os.path.join(src, "Multiturn"))
        self._tail_index = None

    def __getstate__(self):  # the tail index is rebuilt lazily where it is needed (e.g. in a Beam worker)
        return {**self.__dict__, "_tail_index": None}

    def units(self) -> list[str]:
        files = sorted(glob.glob(os.path.join(self.src, "**", "*.parquet"), recursive=True))
        if not files:
            raise FileNotFoundError(f"no *.parquet below {self.src}")
        units = []
        for path in files:
            if self._is_multiturn(path) and not self.include_multiturn:
                log.info("ignoring multi-turn annotation file %s (single-turn build)", path)
                continue
            units.append(os.path.relpath(path, self.src))
        return units

    @staticmethod
    def _is_multiturn(path: str) -> bool:
        """Whether a parquet file has the multi-turn `data` column (False when unreadable: `read` reports it)."""
        pa, pq = _pyarrow()
        try:
            return "data" in pq.read_schema(path).names
        except (OSError, pa.ArrowException):
            return False

    def read(self, unit: str) -> Iterator[RawPair | Skip]:
        pa, pq = _pyarrow()
        path = os.path.join(self.src, unit)
        task = task_name(path)
        row_no = 0
        try:
            multiturn = "data" in pq.read_schema(path).names
            for batch in pq.ParquetFile(path).iter_batches(batch_size=4096):
                for row in batch.to_pylist():
                    row_no += 1
                    rid = f"{FORMAT}:{unit}:{row_no}"
                    if not multiturn:
                        yield self._pair(rid, row, task)
                        continue
                    turns = row.get("data") or []
                    if not turns:
                        yield Skip(rid, BAD_ANNOTATION, "empty data column")
                    for k, turn in enumerate(turns, 1):
                        yield self._pair(f"{rid}/turn{k}", turn or {}, task)
        except (OSError, pa.ArrowException) as e:  # a damaged file: counted, the rows read so far are kept
            yield Skip(f"{FORMAT}:{unit}", DAMAGED_ARCHIVE, f"unreadable parquet after row {row_no}: {e}")

    def _pair(self, rid: str, row: dict, task: str) -> RawPair | Skip:
        if "input_images" not in row or "output_images" not in row:
            return Skip(rid, BAD_ANNOTATION, "no input_images/output_images")
        inputs, outputs = _flatten(row["input_images"]), _flatten(row["output_images"])
        if len(inputs) != 1 or len(outputs) != 1:
            return Skip(rid, NOT_ONE_TO_ONE, f"{len(inputs)} inputs, {len(outputs)} outputs")
        return RawPair(rid, str(row.get("prompt") or ""), self._resolve(inputs[0]), self._resolve(outputs[0]),
                       task=task)

    def _resolve(self, rel: str) -> str:
        rel = rel.lstrip("/")
        variants = [rel] + [rel.replace(old, new, 1) for old, new in _PREFIX_FIXES if rel.startswith(old)]
        candidates = [os.path.join(root, v) for v in variants for root in self.roots]
        found = next((c for c in candidates if os.path.isfile(c)), None)
        if found is None:
            matches = self._index().get(_tail(rel), [])
            found = matches[0] if len(matches) == 1 else candidates[0]
        return found

    def _index(self) -> dict[str, list[str]]:
        """{last path components: [files]} over the image trees, built on the first unresolved path."""
        if self._tail_index is None:
            index: dict[str, list[str]] = {}
            for root in self.roots[1:] if any(os.path.isdir(r) for r in self.roots[1:]) else self.roots[:1]:
                for dirpath, _, names in os.walk(root):
                    for name in names:
                        if name.lower().endswith(_IMAGE_EXTS):
                            full = os.path.join(dirpath, name)
                            rel = os.path.relpath(full, root)
                            for depth in range(1, min(3, rel.count(os.sep) + 1) + 1):
                                index.setdefault(_tail(rel, depth), []).append(full)
            self._tail_index = index
        return self._tail_index


def _tail(rel: str, depth: int | None = None) -> str:
    """The last `depth` components of a relative path (default: all of them, at most 3)."""
    parts = [p for p in rel.replace("\\", "/").split("/") if p]
    depth = min(len(parts), 3) if depth is None else depth
    return "/".join(parts[-depth:])
