"""Loaders of the editing benchmarks, from the user's copies, local or on gs:// (nothing is downloaded).

Each loader yields `Sample`s (id, source image uint8 (H, W, 3), instruction, source / target captions, edit mask or
None, category) and records every sample it cannot use in a `Skips` (counted per reason, logged, listed).
Reading needs pyarrow (the `data` extra) for EMU-Edit and GEdit-Bench. Imports nothing of the `varedit_jax` model
(only `storage`, for paths; the TFDS builders in `tfds_builders` wrap these readers too).

EMU-Edit (`facebook/emu_edit_test_set`): ROOT/data/{test,validation}-*.parquet, columns instruction, image (HF
  Image struct {bytes, path}), task, split, idx, hash, input_caption, output_caption. Use split "test" (3,589 rows):
  the `..._generations` repo names the splits the other way round, so a loaded split whose size is that of the other
  one (or whose files carry `edited_image`) is warned about. Categories are the `task` values as found (count them
  with `category_counts`; the paper's per-task table does not match the release). No ground-truth output exists.
PIE-Bench (cure-lab/PnPInversion): ROOT/mapping_file.json + ROOT/annotation_images/<image_path>; ROOT may also be
  the folder holding `data/`. Per entry: editing_instruction (what instruction editors consume), original_prompt /
  editing_prompt with `[` `]` removed, editing_type_id "0".."9" (category = its name in `PIE_TYPES`), blended_word,
  and the mask: flat [start, length, ...] runs over the row-major 512x512 grid (lengths clipped at the end), then
  the first / last row and column forced to 1 as the official `mask_decode` does.
GEdit-Bench (`stepfun-ai/GEdit-Bench`): Arrow files (`save_to_disk` streams or Arrow IPC files) anywhere under ROOT,
  columns task_type, key, instruction, instruction_language ("en" / "cn"), input_image, input_image_raw,
  Intersection_exist; the source is input_image_raw when present (else input_image); id "<task>/<lang>/<key>".
ImgEdit-Bench basic suite (PKU-YuanGroup/ImgEdit `Benchmark/Basic`): ROOT/basic_edit.json (or ROOT/Basic/...) =
  {key: {"id": "<folder>/<name>.jpg", "prompt", "edit_type"}} with the images of the extracted `Benchmark.tar` at
  ROOT/<id> (or ROOT/singleturn/<id>); category = edit_type; the judge prompts per edit type are the benchmark's
  own `prompts.json` beside basic_edit.json (`imgedit_prompts`). Output file of a sample: `<key>.png`.
Record datasets (`records`, e.g. the toy eval set): samples with their target image and edit mask (`Sample.target`).
"""
import collections
import dataclasses
import json
import logging
import os
from typing import Iterator

import numpy as np
from etils import epath

from data_pipelines import records
from data_pipelines.records import decode_image, read_image
from varedit_jax import storage

log = logging.getLogger(__name__)

EMU_SPLIT_SIZES = {"test": 3589, "validation": 2022}
EMU_COLUMNS = ("instruction", "image", "task", "idx", "input_caption", "output_caption")
PIE_MASK_SHAPE = (512, 512)
PIE_TYPES = {"0": "random", "1": "change_object", "2": "add_object", "3": "delete_object",
             "4": "change_attribute_content", "5": "change_attribute_pose", "6": "change_attribute_color",
             "7": "change_attribute_material", "8": "change_background", "9": "change_style"}
PIE_FIELDS = ("image_path", "original_prompt", "editing_prompt", "editing_instruction", "editing_type_id", "mask")
GEDIT_COLUMNS = ("task_type", "key", "instruction", "instruction_language")
IMGEDIT_FIELDS = ("id", "prompt", "edit_type")
# ImgEdit-Bench edit types as the paper's Table 2 names them.
IMGEDIT_TYPES = {"background": "Background", "extract": "Extract", "adjust": "Attribute", "style": "Style",
                 "remove": "Remove", "replace": "Replace", "add": "Add", "action": "Motion", "compose": "Hybrid"}

# Skip reasons.
MISSING_IMAGE = "missing image"
CORRUPT_IMAGE = "corrupt image"
BAD_ANNOTATION = "bad annotation"
EMPTY_INSTRUCTION = "empty instruction"
SIZE_MISMATCH = "image size differs from the mask"


@dataclasses.dataclass(frozen=True)
class Sample:
    """One benchmark item. Captions are "" where the benchmark has none; mask (H, W) uint8, 1 = edit region."""
    id: str
    source: np.ndarray
    instruction: str
    source_caption: str
    target_caption: str
    mask: np.ndarray | None
    category: str
    extra: dict = dataclasses.field(default_factory=dict)
    target: np.ndarray | None = None  # the known result (record datasets such as the toy eval set), else None


class Skips:
    """Samples a loader could not use: counts per reason, and (id, reason, detail) rows; each one is logged."""

    def __init__(self):
        self.rows: list[tuple[str, str, str]] = []
        self.counts: collections.Counter = collections.Counter()

    def add(self, sample_id: str, reason: str, detail: str = "") -> None:
        self.rows.append((sample_id, reason, detail))
        self.counts[reason] += 1
        log.warning("skipped %s: %s%s", sample_id, reason, f" ({detail})" if detail else "")

    def __len__(self) -> int:
        return len(self.rows)

    def summary(self) -> str:
        return ", ".join(f"{n} {reason}" for reason, n in sorted(self.counts.items())) or "none"


def category_counts(samples) -> dict[str, int]:
    """{category: count} of an iterable of samples, in first-seen order."""
    return dict(collections.Counter(s.category for s in samples))


def output_name(sample_id: str) -> str:
    """The relative PNG path of a sample's output: the id after its benchmark prefix, ":" as "/" (e.g.
    "gedit_bench:subject-add/en/k1" -> "subject-add/en/k1.png", as GEdit's own layout; "imgedit_bench:12" ->
    "12.png", as ImgEdit's)."""
    parts = [p for p in sample_id.split(":", 1)[-1].replace(":", "/").split("/") if p not in ("", ".", "..")]
    return "/".join(parts or ["sample"]) + ".png"


def strip_brackets(prompt: str) -> str:
    """PIE-Bench prompts mark edited words with [ ]; the evaluation removes the brackets."""
    return prompt.replace("[", "").replace("]", "")


def decode_pie_mask(encoded, shape: tuple[int, int] = PIE_MASK_SHAPE) -> np.ndarray:
    """PIE-Bench run-length mask -> uint8 (H, W), 1 = edit region, border rows / columns forced to 1.

    `encoded` = [start0, length0, start1, length1, ...] over the row-major flattened grid; runs are clipped at the
    end of the grid. Raises ValueError for an odd-length list, non-integers, or negative / out-of-range starts.
    """
    if not isinstance(encoded, (list, tuple)) or len(encoded) % 2:
        raise ValueError("a PIE-Bench mask is a flat list [start, length, ...] of even length")
    total = shape[0] * shape[1]
    flat = np.zeros(total, np.uint8)
    for start, length in zip(encoded[0::2], encoded[1::2]):
        if not (isinstance(start, int) and isinstance(length, int)) or isinstance(start, bool):
            raise ValueError(f"mask run ({start!r}, {length!r}) is not a pair of integers")
        if not 0 <= start < total or length < 0:
            raise ValueError(f"mask run ({start}, {length}) lies outside a {shape[0]}x{shape[1]} grid")
        flat[start:min(start + length, total)] = 1
    mask = flat.reshape(shape)
    mask[0, :] = mask[-1, :] = mask[:, 0] = mask[:, -1] = 1
    return mask


# ---------------------------------------------------------------------------------------------------- EMU-Edit
def _pyarrow():
    try:
        import pyarrow  # noqa: F401
        import pyarrow.ipc  # noqa: F401
        import pyarrow.parquet  # noqa: F401
    except ImportError as e:
        raise ImportError("reading EMU-Edit / GEdit-Bench needs pyarrow: pip install 'varedit_jax[data]'") from e
    return pyarrow


def _image_cell(cell, sample_id: str, skips: Skips) -> np.ndarray | None:
    """An HF Image struct {bytes, path} (or raw bytes) -> uint8 RGB, or None after recording the skip."""
    data = cell.get("bytes") if isinstance(cell, dict) else cell
    if not data:
        skips.add(sample_id, MISSING_IMAGE, "no image bytes")
        return None
    try:
        return decode_image(data)
    except ValueError as e:
        skips.add(sample_id, CORRUPT_IMAGE, str(e))
        return None


def _text(row: dict, key: str) -> str:
    value = row.get(key)
    return value.strip() if isinstance(value, str) else ""


def emu_edit(root, split: str = "test", skips: Skips | None = None) -> Iterator[Sample]:
    """EMU-Edit samples of `split` from ROOT/data/<split>-*.parquet (see the module docstring)."""
    pq = _pyarrow().parquet
    if split not in EMU_SPLIT_SIZES:
        raise ValueError(f"EMU-Edit split must be one of {sorted(EMU_SPLIT_SIZES)}, got {split!r}")
    files = sorted(storage.path(root).joinpath("data").glob(f"{split}-*.parquet"), key=os.fspath)
    if not files:
        raise FileNotFoundError(f"no EMU-Edit shards {storage.path(root) / 'data' / (split + '-*.parquet')}")
    skips = skips if skips is not None else Skips()
    shards = [_emu_shard(pq, path) for path in files]
    rows = sum(shard.metadata.num_rows for shard in shards)
    if rows != EMU_SPLIT_SIZES[split]:
        swapped = [s for s, n in EMU_SPLIT_SIZES.items() if s != split and n == rows]
        log.warning("EMU-Edit split %r has %d rows, expected %d%s", split, rows, EMU_SPLIT_SIZES[split],
                    f" - that is the size of {swapped[0]!r}: the split names look swapped" if swapped else "")
    for shard in shards:
        for batch in shard.iter_batches(batch_size=64, columns=list(EMU_COLUMNS)):
            for row in batch.to_pylist():
                sample_id = f"emu_edit:{split}:{row['idx']}"
                instruction = _text(row, "instruction")
                if not instruction:
                    skips.add(sample_id, EMPTY_INSTRUCTION)
                    continue
                image = _image_cell(row["image"], sample_id, skips)
                if image is not None:
                    yield Sample(sample_id, image, instruction, _text(row, "input_caption"),
                                 _text(row, "output_caption"), None, _text(row, "task"), dict(idx=row["idx"]))


def _emu_shard(pq, path: str):
    """An opened EMU-Edit parquet shard; raises ValueError for unreadable files or missing columns."""
    try:
        shard = pq.ParquetFile(storage.path(path).open("rb"))  # local or gs://
    except Exception as e:  # pyarrow raises ArrowInvalid / OSError for damaged files
        raise ValueError(f"{path}: cannot read parquet: {e}") from e
    names = set(shard.schema_arrow.names)
    missing = [c for c in EMU_COLUMNS if c not in names]
    if missing:
        raise ValueError(f"{path}: not an EMU-Edit shard, columns {missing} are missing (has {sorted(names)})")
    if "edited_image" in names:
        log.warning("%s has an edited_image column: this is the emu_edit_test_set_generations repo, whose split "
                    "names are swapped (its 'validation' is the 3,589-sample test set)", path)
    return shard


# --------------------------------------------------------------------------------------------------- PIE-Bench
def _pie_root(root) -> epath.Path:
    root = storage.path(root)
    for candidate in (root, root / "data"):
        if (candidate / "mapping_file.json").is_file():
            return candidate
    raise FileNotFoundError(f"no mapping_file.json in {root} or {root / 'data'}")


def pie_bench(root, skips: Skips | None = None) -> Iterator[Sample]:
    """PIE-Bench samples from ROOT/mapping_file.json + ROOT/annotation_images (see the module docstring)."""
    root = _pie_root(root)
    skips = skips if skips is not None else Skips()
    path = root / "mapping_file.json"
    mapping = _json(path)
    if not isinstance(mapping, dict):
        raise ValueError(f"{path}: expected an object keyed by sample id")
    for key, item in mapping.items():
        sample_id = f"pie_bench:{key}"
        missing = [f for f in PIE_FIELDS if not isinstance(item, dict) or f not in item]
        if missing:
            skips.add(sample_id, BAD_ANNOTATION, f"fields {missing} missing")
            continue
        not_text = [f for f in PIE_FIELDS[:4] if not isinstance(item[f], str)]
        if not_text:
            skips.add(sample_id, BAD_ANNOTATION, f"fields {not_text} are not strings")
            continue
        instruction = item["editing_instruction"].strip()
        if not instruction:
            skips.add(sample_id, EMPTY_INSTRUCTION)
            continue
        try:
            mask = decode_pie_mask(item["mask"])
        except ValueError as e:
            skips.add(sample_id, BAD_ANNOTATION, str(e))
            continue
        image_path = root / "annotation_images" / item["image_path"]
        try:
            image = read_image(image_path)
        except FileNotFoundError:
            skips.add(sample_id, MISSING_IMAGE, image_path)
            continue
        except ValueError as e:
            skips.add(sample_id, CORRUPT_IMAGE, str(e))
            continue
        if image.shape[:2] != mask.shape:
            skips.add(sample_id, SIZE_MISMATCH, f"image {image.shape[:2]}, mask {mask.shape}")
            continue
        type_id = str(item["editing_type_id"])
        yield Sample(sample_id, image, instruction, strip_brackets(item["original_prompt"]),
                     strip_brackets(item["editing_prompt"]), mask, PIE_TYPES.get(type_id, type_id),
                     dict(editing_type_id=type_id, blended_word=item.get("blended_word", ""),
                          image_path=item["image_path"]))


# ------------------------------------------------------------------------------------------------- GEdit-Bench
def _arrow_batches(path) -> list:
    """Record batches of an Arrow stream (HF `save_to_disk`) or Arrow IPC file, memory-mapped (gs://: from a
    temporary download); raises ValueError if neither."""
    pa = _pyarrow()
    with storage.local_copy(path) as local:
        try:
            return list(pa.ipc.open_stream(pa.memory_map(str(local))))
        except (pa.ArrowInvalid, OSError):
            pass
        try:
            reader = pa.ipc.open_file(pa.memory_map(str(local)))
        except (pa.ArrowInvalid, OSError) as e:
            raise ValueError(f"{path}: not an Arrow stream or file: {e}") from e
        return [reader.get_batch(i) for i in range(reader.num_record_batches)]


def gedit_bench(root, language: str | None = None, skips: Skips | None = None) -> Iterator[Sample]:
    """GEdit-Bench samples from the Arrow files under ROOT, optionally of one language ("en" / "cn")."""
    files = storage.find_files(root, ".arrow")
    if not files:
        raise FileNotFoundError(f"no GEdit-Bench .arrow files under {root}")
    skips = skips if skips is not None else Skips()
    for path in files:
        for batch in _arrow_batches(path):
            names = set(batch.schema.names)
            missing = [c for c in GEDIT_COLUMNS if c not in names]
            if missing or not names & {"input_image", "input_image_raw"}:
                raise ValueError(f"{path}: not GEdit-Bench, columns {missing or ['input_image']} are missing")
            for row in batch.to_pylist():
                lang = _text(row, "instruction_language")
                if language is not None and lang != language:
                    continue
                sample_id = f"gedit_bench:{_text(row, 'task_type')}/{lang}/{row['key']}"
                instruction = _text(row, "instruction")
                if not instruction:
                    skips.add(sample_id, EMPTY_INSTRUCTION)
                    continue
                image = _image_cell(row.get("input_image_raw") or row.get("input_image"), sample_id, skips)
                if image is not None:
                    yield Sample(sample_id, image, instruction, "", "", None, _text(row, "task_type"),
                                 dict(key=row["key"], language=lang,
                                      intersection_exist=bool(row.get("Intersection_exist", False))))


# ----------------------------------------------------------------------------------------------- ImgEdit-Bench
def _imgedit_file(root: epath.Path, name: str) -> epath.Path:
    for candidate in (root / name, root / "Basic" / name, root / "Benchmark" / "Basic" / name):
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(f"no {name} in {root} or {root / 'Basic'}")


def _json(path: epath.Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not JSON: {e}") from e


def imgedit_prompts(root) -> dict[str, str]:
    """ImgEdit-Bench's judge prompts {edit_type: text with <edit_prompt>} from the benchmark's prompts.json."""
    path = _imgedit_file(storage.path(root), "prompts.json")
    prompts = _json(path)
    if not isinstance(prompts, dict) or not all(isinstance(v, str) and "<edit_prompt>" in v for v in prompts.values()):
        raise ValueError(f"{path}: expected {{edit_type: prompt text holding <edit_prompt>}}")
    return prompts


def imgedit_bench(root, skips: Skips | None = None) -> Iterator[Sample]:
    """ImgEdit-Bench basic-suite samples from ROOT/basic_edit.json + the extracted images (module docstring)."""
    root = storage.path(root)
    path = _imgedit_file(root, "basic_edit.json")
    edits = _json(path)
    if not isinstance(edits, dict):
        raise ValueError(f"{path}: expected an object keyed by sample key")
    skips = skips if skips is not None else Skips()
    image_roots = (root, root / "singleturn", root / "Benchmark" / "singleturn")
    for key, item in edits.items():
        sample_id = f"imgedit_bench:{key}"
        if not isinstance(item, dict) or not all(isinstance(item.get(f), str) for f in IMGEDIT_FIELDS):
            skips.add(sample_id, BAD_ANNOTATION, f"fields {list(IMGEDIT_FIELDS)} must be strings")
            continue
        if not item["prompt"].strip():
            skips.add(sample_id, EMPTY_INSTRUCTION)
            continue
        candidates = [r / item["id"] for r in image_roots]
        image_path = next((c for c in candidates if c.is_file()), candidates[0])
        try:
            image = read_image(image_path)
        except FileNotFoundError:
            skips.add(sample_id, MISSING_IMAGE, str(image_path))
            continue
        except ValueError as e:
            skips.add(sample_id, CORRUPT_IMAGE, str(e))
            continue
        yield Sample(sample_id, image, item["prompt"].strip(), "", "", None, item["edit_type"],
                     dict(key=key, edit_type=item["edit_type"], image_path=item["id"]))


# ----------------------------------------------------------------------------------------------- record datasets
def record_samples(paths, skips: Skips | None = None) -> Iterator[Sample]:
    """Samples of finished record datasets (`records`), with their targets and edit masks (None without one)."""
    skips = skips if skips is not None else Skips()
    for rec in records.iter_records(paths):
        try:
            source, target = decode_image(rec["source"]), decode_image(rec["target"])
        except ValueError as e:
            skips.add(rec["id"], CORRUPT_IMAGE, str(e))
            continue
        mask = records.decode_mask(rec["mask"]) if rec.get("mask") is not None else None
        yield Sample(rec["id"], source, rec["instruction"], "", "", mask, rec.get("task") or "", target=target)


LOADERS = {"emu_edit": emu_edit, "pie_bench": pie_bench, "imgedit_bench": imgedit_bench, "gedit": gedit_bench,
           "toy": record_samples}


def load(benchmark: str, root, skips: Skips | None = None) -> Iterator[Sample]:
    """The samples of `benchmark` (a `LOADERS` name) from ROOT: its local copy (toy: record dataset directories,
    comma-separated), or `tfds:NAME@DATA_DIR` for a TFDS build of it (`tfds_builders`)."""
    if benchmark not in LOADERS:
        raise ValueError(f"unknown benchmark {benchmark!r}; choose from {', '.join(LOADERS)}")
    if str(root).startswith("tfds:"):
        from data_pipelines import tfds_builders
        return tfds_builders.benchmark_samples(str(root), skips)
    if benchmark == "toy":
        return record_samples(str(root).split(","), skips=skips)
    return LOADERS[benchmark](root, skips=skips)
