"""Edit-pair records: the one on-disk format of every dataset built by `data_pipelines`.

Plain ArrayRecord shards (`group_size:1`, uncompressed: images are already compressed) holding one msgpack map per
edit pair. Readable without TensorFlow or TFDS: `open_records(paths)` (a grain ArrayRecordDataSource) + `decode_record`.
A dataset directory is local or on gs:// (`varedit_jax.storage` paths): shards are read from gs:// natively by
array_record, or copied to a local folder first by `stage` (opt-in: `data.stage_dir`).

Layout of a dataset directory DIR:
  DIR/build.json                      the build options; a re-run into DIR must use the same ones
  DIR/records-00000.array_record ...  the shards
  DIR/manifest/chunk-00000.json ...   one per committed chunk: its shard (or none), the ids it wrote, skipped and
                                      filtered; a chunk is committed when its manifest exists (written atomically
                                      after its shard was renamed into place), so a re-run resumes exactly
  DIR/dataset.json                    written when a build completes: counts and the shard list (readers need it)
  DIR/skipped.jsonl                   every skipped or filtered pair: {"id", "reason", "detail"}

Record schema (version 1), msgpack map with string keys:
  id           str          unique "<format>:<locator>", e.g. "seed_edit:real_editing/annotations/split_0001.jsonl:17"
                            (line numbers from 1; multi-turn pairs end in "/turn<k>")
  instruction  str          the edit instruction, non-empty, surrounding whitespace stripped
  source       bytes        the source image file as stored in the raw data (JPEG, PNG, ...), verified to decode
  target       bytes        the edited image file, likewise
  source_size  [int, int]   (h, w) of the source image
  target_size  [int, int]   (h, w) of the target image
  mask         bytes | nil  PNG (mode L) of the target's size, 1 = pixel the edit changes (toy data), else nil
  task         str          edit type when the raw data names one (toy op, ImgEdit task), else ""
"""
import collections
import dataclasses
import io
import json
import logging
import os
import shutil
from typing import Iterable, Iterator, Sequence

import grain
import msgpack
import numpy as np
from array_record.python.array_record_module import ArrayRecordReader, ArrayRecordWriter
from PIL import Image, UnidentifiedImageError

from varedit_jax import storage

SCHEMA_VERSION = 1
FORMAT_NAME = "varedit_edit_pairs"
WRITER_OPTIONS = "group_size:1,uncompressed"
RECORD_KEYS = ("id", "instruction", "source", "target", "source_size", "target_size", "mask", "task")

# Skip reasons (a closed vocabulary, so counts aggregate across formats).
MISSING_IMAGE = "missing image"
CORRUPT_IMAGE = "corrupt image"
EMPTY_INSTRUCTION = "empty instruction"
BAD_ANNOTATION = "bad annotation"
NOT_ONE_TO_ONE = "not a one-to-one edit"
KNOWN_CORRUPT = "known corrupt range"
TOO_SMALL = "image too small"
EXTREME_ASPECT = "extreme aspect ratio"
DUPLICATE_ID = "duplicate id"
DAMAGED_ARCHIVE = "damaged archive"
# Filter reasons (the quality-score filter).
BELOW_MIN_SCORE = "score below threshold"
NO_SCORE = "no score"

log = logging.getLogger("data_pipelines")

ImageRef = bytes | str  # encoded image bytes, or a path to an image file


@dataclasses.dataclass(frozen=True)
class RawPair:
    """One (source, instruction, target) pair as a reader found it; images are not loaded yet."""
    id: str
    instruction: str
    source: ImageRef
    target: ImageRef
    task: str = ""
    mask: bytes | None = None  # PNG, 1 = edited pixel


@dataclasses.dataclass(frozen=True)
class Skip:
    """A pair (or an annotation unit) that cannot become a record."""
    id: str
    reason: str
    detail: str = ""


@dataclasses.dataclass(frozen=True)
class Filtered:
    """A valid pair dropped by the quality filter."""
    id: str
    reason: str
    detail: str = ""


@dataclasses.dataclass(frozen=True)
class Checks:
    """Per-pair validity checks besides decoding: min image side (px) and max aspect ratio (long/short side)."""
    min_side: int = 0
    max_aspect: float | None = None


class Scores:
    """Per-pair quality scores (e.g. VLM judge), keyed by record id; a pair passes with score >= min_score.

    File formats: `*.jsonl`: lines {"id": ..., "score": ...}; anything else: one JSON object {id: score}.
    Pairs without a score are filtered (reason NO_SCORE).
    """

    def __init__(self, path: str, min_score: float):
        self.path, self.min_score = path, float(min_score)
        text = storage.path(path).read_text(encoding="utf-8")
        self.scores = {}
        if path.endswith(".jsonl"):
            for n, line in enumerate(text.splitlines(), 1):
                if line.strip():
                    try:
                        row = json.loads(line)
                        self.scores[str(row["id"])] = float(row["score"])
                    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
                        raise ValueError(f"{path}:{n}: expected a JSON line {{\"id\": ..., \"score\": ...}}: {e!r}")
        else:
            try:
                data = json.loads(text)
                if not isinstance(data, dict):
                    raise ValueError("not a JSON object")
                self.scores = {str(k): float(v) for k, v in data.items()}
            except (json.JSONDecodeError, TypeError, ValueError) as e:
                raise ValueError(f"{path}: expected a JSON object {{id: score}} (or a .jsonl file): {e}")

    def check(self, pair_id: str) -> Filtered | None:
        score = self.scores.get(pair_id)
        if score is None:
            return Filtered(pair_id, NO_SCORE)
        if not score >= self.min_score:  # NaN scores fail too
            return Filtered(pair_id, BELOW_MIN_SCORE, f"{score} < {self.min_score}")
        return None


# ----------------------------------------------------------------------------------------------------------------
# Pair -> record

def _load_image(ref: ImageRef) -> tuple[bytes, tuple[int, int]] | str:
    """(bytes, (h, w)) of a fully decoded image, or the skip reason."""
    if isinstance(ref, str):
        if not storage.path(ref).is_file():
            return MISSING_IMAGE
        ref = storage.path(ref).read_bytes()
    try:
        with Image.open(io.BytesIO(ref)) as im:
            im.load()
            w, h = im.size
    except Exception:  # PIL raises many types for bad data (OSError, SyntaxError, ValueError, ...)
        return CORRUPT_IMAGE
    return ref, (h, w)


def _shape_check(size: tuple[int, int], checks: Checks) -> str | None:
    h, w = size
    if min(h, w) < max(checks.min_side, 1):
        return TOO_SMALL
    if checks.max_aspect is not None and max(h, w) / min(h, w) > checks.max_aspect:
        return EXTREME_ASPECT
    return None


def to_record(pair: RawPair, checks: Checks = Checks(), scores: Scores | None = None) -> bytes | Skip | Filtered:
    """Validates a pair (instruction, quality score, both images decode, size checks) and encodes its record."""
    instruction = pair.instruction.strip() if isinstance(pair.instruction, str) else ""
    if not instruction:
        return Skip(pair.id, EMPTY_INSTRUCTION)
    if scores is not None and (filtered := scores.check(pair.id)) is not None:
        return filtered
    images = []
    for role, ref in (("source", pair.source), ("target", pair.target)):
        loaded = _load_image(ref)
        if isinstance(loaded, str):
            return Skip(pair.id, loaded, f"{role} {ref if isinstance(ref, str) else '<bytes>'}")
        if (reason := _shape_check(loaded[1], checks)) is not None:
            return Skip(pair.id, reason, f"{role} {loaded[1][0]}x{loaded[1][1]}")
        images.append(loaded)
    (src, src_size), (tgt, tgt_size) = images
    return encode_record(dict(id=pair.id, instruction=instruction, source=src, target=tgt, source_size=list(src_size),
                              target_size=list(tgt_size), mask=pair.mask, task=pair.task))


def encode_record(record: dict) -> bytes:
    missing = set(RECORD_KEYS) - set(record)
    if missing:
        raise ValueError(f"record {record.get('id')!r} lacks {sorted(missing)}")
    return msgpack.packb({k: record[k] for k in RECORD_KEYS}, use_bin_type=True)


def decode_record(data: bytes) -> dict:
    """The record dict of one serialized record; raises ValueError when it does not follow the schema."""
    try:
        record = msgpack.unpackb(data, raw=False)
    except Exception as e:
        raise ValueError(f"not a msgpack record: {e}") from e
    if not isinstance(record, dict) or set(RECORD_KEYS) - set(record):
        raise ValueError(f"record does not follow schema v{SCHEMA_VERSION} (keys {RECORD_KEYS})")
    return record


def decode_image(data: bytes) -> np.ndarray:
    """Encoded image bytes -> uint8 (H, W, 3) RGB; raises ValueError when they do not decode."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            return np.asarray(im.convert("RGB"))
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise ValueError(f"cannot decode image: {e}") from e


def read_image(path) -> np.ndarray:
    """An image file (local or gs://) -> uint8 (H, W, 3) RGB; raises FileNotFoundError / ValueError."""
    path = storage.path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no image at {path}")
    try:
        return decode_image(path.read_bytes())
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from e


def decode_mask(data: bytes) -> np.ndarray:
    """(h, w) uint8 mask (1 = edited) from its PNG bytes."""
    with Image.open(io.BytesIO(data)) as im:
        return np.asarray(im.convert("L"), dtype=np.uint8)


def encode_png(array: np.ndarray) -> bytes:
    """PNG bytes of a (h, w, 3) or (h, w) uint8 array."""
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(array)).save(buf, format="PNG")
    return buf.getvalue()


# ----------------------------------------------------------------------------------------------------------------
# Resumable sharded writing

def shard_name(chunk: int) -> str:
    return f"records-{chunk:05d}.array_record"


def _write_shard(path, records: Sequence[tuple[str, bytes]]) -> None:
    """Writes a shard whole: locally to a temporary name renamed into place; on gs:// one upload when complete."""
    with storage.staged(path) as local:
        tmp = local.with_name(f"{local.name}.tmp{os.getpid()}")
        writer = ArrayRecordWriter(str(tmp), WRITER_OPTIONS)
        for _, data in records:
            writer.write(data)
        writer.close()
        os.replace(tmp, local)


def commit_chunk(out, chunk: int, records: Sequence[tuple[str, bytes]], skipped: Iterable[Skip],
                 filtered: Iterable[Filtered]) -> dict:
    """Writes chunk `chunk` of DIR `out` (local or gs://) atomically: its shard (if it has records), then its
    manifest."""
    out = storage.path(out)
    shard = None
    if records:
        shard = shard_name(chunk)
        _write_shard(out / shard, records)
    manifest = {"chunk": chunk, "shard": shard, "ids": [i for i, _ in records],
                "skipped": [dataclasses.asdict(s) for s in skipped],
                "filtered": [dataclasses.asdict(f) for f in filtered]}
    storage.write_text(out / "manifest" / f"chunk-{chunk:05d}.json", json.dumps(manifest))
    return manifest


class BuildDir:
    """A dataset directory being built: resumes from committed chunks, commits new ones, finalizes.

    Opening removes what an interrupted run left uncommitted (temporary files, shards without a manifest) and the
    previous `dataset.json` (the directory is incomplete until `finalize`).
    """

    def __init__(self, out, options: dict):
        self.out = storage.makedirs(out)
        storage.makedirs(self.out / "manifest")
        self._check_options(options)
        self.reload()
        committed = {m["shard"] for m in self.manifests if m["shard"]}
        for path in [*self.out.glob("*.tmp*"), *(self.out / "manifest").glob("*.tmp*")]:
            path.unlink()
        for path in self.out.glob("records-*.array_record"):
            if path.name not in committed:
                log.info("removing uncommitted shard %s", path)
                path.unlink()
        for name in ("dataset.json", "skipped.jsonl"):
            if (self.out / name).exists():
                (self.out / name).unlink()

    def reload(self) -> None:
        """(Re-)reads the committed manifests, e.g. after chunks were committed by Beam workers."""
        self.manifests = [json.loads(path.read_text(encoding="utf-8"))
                          for path in sorted((self.out / "manifest").glob("chunk-*.json"))]
        self.done_ids = set()
        for m in self.manifests:
            self.done_ids.update(m["ids"])
            self.done_ids.update(s["id"] for s in m["skipped"])
            self.done_ids.update(f["id"] for f in m["filtered"])
        self.num_written = sum(len(m["ids"]) for m in self.manifests)
        self.next_chunk = max((m["chunk"] for m in self.manifests), default=-1) + 1

    def _check_options(self, options: dict) -> None:
        path = self.out / "build.json"
        if path.exists():
            previous = json.loads(path.read_text(encoding="utf-8"))
            if previous != options:
                changed = sorted(k for k in set(previous) | set(options) if previous.get(k) != options.get(k))
                raise ValueError(f"{self.out} was built with other options ({', '.join(changed)} differ: "
                                 f"{ {k: previous.get(k) for k in changed} }); use another --out")
        else:
            storage.write_text(path, json.dumps(options, indent=1))

    def commit(self, records: Sequence[tuple[str, bytes]], skipped: Sequence[Skip],
               filtered: Sequence[Filtered]) -> None:
        if not (records or skipped or filtered):
            return
        manifest = commit_chunk(self.out, self.next_chunk, records, skipped, filtered)
        self.manifests.append(manifest)
        self.next_chunk += 1
        self.num_written += len(records)

    def finalize(self) -> dict:
        """Writes `dataset.json` and `skipped.jsonl`; returns the dataset summary."""
        manifests = sorted(self.manifests, key=lambda m: m["chunk"])
        skipped = [s for m in manifests for s in m["skipped"]]
        filtered = [f for m in manifests for f in m["filtered"]]
        summary = {
            "format": FORMAT_NAME, "schema_version": SCHEMA_VERSION,
            "num_records": sum(len(m["ids"]) for m in manifests),
            "shards": [{"file": m["shard"], "num_records": len(m["ids"])} for m in manifests if m["shard"]],
            "skipped": _count(s["reason"] for s in skipped),
            "filtered": _count(f["reason"] for f in filtered),
        }
        storage.write_text(self.out / "skipped.jsonl", "".join(json.dumps(e) + "\n" for e in skipped + filtered))
        storage.write_text(self.out / "dataset.json", json.dumps(summary, indent=1))
        return summary


def _count(reasons: Iterable[str]) -> dict[str, int]:
    return dict(sorted(collections.Counter(reasons).items()))


# ----------------------------------------------------------------------------------------------------------------
# Reading

def read_summary(path) -> dict:
    """The `dataset.json` of a finished build; raises FileNotFoundError for an unfinished or foreign directory."""
    summary_path = storage.path(path) / "dataset.json"
    if not summary_path.is_file():
        raise FileNotFoundError(f"{path} is not a finished record dataset (no dataset.json); "
                                "run `python -m data_pipelines.build` again to finish it")
    summary = json.loads(summary_path.read_text(encoding="utf-8"))
    if summary.get("format") != FORMAT_NAME or summary.get("schema_version") != SCHEMA_VERSION:
        raise ValueError(f"{summary_path}: expected format {FORMAT_NAME} v{SCHEMA_VERSION}, "
                         f"got {summary.get('format')} v{summary.get('schema_version')}")
    return summary


class UnreadableShard(ValueError):
    """A record shard that is missing, empty, truncated or otherwise not a readable ArrayRecord file."""


def check_shard(path: str, num_records: int | None = None) -> None:
    """Raises UnreadableShard naming `path` (and why) unless it opens and holds `num_records` records."""
    why = None
    if not storage.path(path).exists():
        why = "the file is missing"
    else:
        try:
            reader = ArrayRecordReader(path)
            count = reader.num_records()
            reader.close()
            if num_records is not None and count != num_records:
                why = f"it holds {count} records, dataset.json says {num_records}"
        except RuntimeError as e:
            why = str(e).strip().split(";")[0] or "truncated or not an ArrayRecord file"
    if why:
        raise UnreadableShard(f"unreadable record shard {path}: {why} (rebuild the dataset, or leave its directory "
                              f"out of the paths)")


def shard_files(path) -> list[tuple[str, int | None]]:
    """(shard path, record count) of each shard of a finished dataset."""
    return [(os.fspath(storage.path(path) / s["file"]), s.get("num_records")) for s in read_summary(path)["shards"]]


def stage(path, stage_dir) -> str:
    """A local copy of the dataset at `path` (gs://) under `stage_dir`, for the fastest random access; shards
    already there with their size are kept (a restarted run does not copy again). Refused (OSError) when the
    shards do not fit the free disk; local datasets are returned as they are."""
    if not storage.is_remote(path):
        return path
    src = storage.path(path)
    dst = storage.path(stage_dir) / storage.bucket_of(src) / os.fspath(src).split("/", 3)[3]
    dst.mkdir(parents=True, exist_ok=True)
    files = [src / "dataset.json"] + [storage.path(f) for f, _ in shard_files(src)]
    sizes = {f.name: f.stat().length for f in files}
    todo = [f for f in files if not (dst / f.name).exists() or (dst / f.name).stat().length != sizes[f.name]]
    need, free = sum(sizes[f.name] for f in todo), shutil.disk_usage(dst).free
    if need > free:
        raise OSError(f"staging {path} needs {need / 2**30:.1f} GiB, {dst} has {free / 2**30:.1f} GiB free: "
                      f"unset data.stage_dir to read the shards from gs:// directly, or free the disk")
    for f in todo:
        f.copy(dst / f.name, overwrite=True)
    return os.fspath(dst)


def open_records(paths: str | Sequence[str]) -> grain.sources.ArrayRecordDataSource:
    """Random-access source of serialized records (bytes; `decode_record` them) over finished datasets (local or
    gs://); a shard that cannot be opened raises UnreadableShard naming it."""
    paths = [paths] if isinstance(paths, str) else list(paths)
    shards = [shard for p in paths for shard in shard_files(p)]
    if not shards:
        raise ValueError(f"no records in {paths}")
    try:
        return grain.sources.ArrayRecordDataSource([f for f, _ in shards])
    except RuntimeError:
        for file, n in shards:  # name the shard (ArrayRecord's own error names none, or not which of many)
            check_shard(file, n)
        raise


class Pairs:
    """Random access over datasets in order: record dataset directories and TFDS builds named "tfds:NAME@DATA_DIR"
    (`tfds_builders`). `pairs[i]` is the raw item (serialized record bytes, or a TFDS pair's record dict) and
    `Pairs.decode(raw)` its record dict (images as encoded bytes), so reading and decoding fail separately."""

    def __init__(self, paths: str | Sequence[str]):
        paths = [paths] if isinstance(paths, str) else list(paths)
        self.parts, shards = [], []
        for path in paths + ["tfds:"]:  # a sentinel flushes the last run of record directories
            if not str(path).startswith("tfds:"):
                shards.append(path)
                continue
            if shards:
                self.parts.append(open_records(shards))
                shards = []
            if path != "tfds:":
                from data_pipelines import tfds_builders
                self.parts.append(tfds_builders.PairSource(str(path)))
        if not paths:
            raise ValueError("no dataset paths given")
        self.ends = np.cumsum([len(p) for p in self.parts])

    def __len__(self) -> int:
        return int(self.ends[-1])

    def __getitem__(self, index: int):
        part = int(np.searchsorted(self.ends, index, side="right"))
        return self.parts[part][index - (int(self.ends[part - 1]) if part else 0)]

    @staticmethod
    def decode(raw) -> dict:
        return raw if isinstance(raw, dict) else decode_record(raw)


def iter_records(paths: str | Sequence[str]) -> Iterator[dict]:
    """Decoded records of finished datasets (or TFDS builds, see `Pairs`), in storage order."""
    pairs = Pairs(paths)
    for i in range(len(pairs)):
        yield pairs.decode(pairs[i])
