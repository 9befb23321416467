"""TFDS `DatasetBuilder`s for SEED-Data-Edit, ImgEdit, EMU-Edit and PIE-Bench, wrapping this package's readers, and
their reading without TensorFlow.

Build (`python -m data_pipelines.tfds_build --builder NAME --manual_dir RAW --data_dir OUT`; examples keep the
readers' order: `disable_shuffling`, so benchmark sample i is the loader's sample i):
`download_and_prepare(download_config=DownloadConfig(manual_dir=RAW))` with `file_format="array_record"`; RAW is
the dataset as its users download it (`MANUAL_DOWNLOAD_INSTRUCTIONS` of each builder says where). No TensorFlow is
needed: images go in as their encoded bytes (stored as they are) or PIL images. (`tfds build` imports TensorFlow.)

Builders (TFDS names; version 1.0.0):
  seed_edit  train   SEED-Data-Edit pairs (`seed_edit.Reader` over RAW: parts, multi-turn decomposed)
  imgedit    train   ImgEdit single-turn pairs (`imgedit.Reader`)
  emu_edit   test    EMU-Edit test split (`benchmarks.emu_edit`)
  pie_bench  test    PIE-Bench (`benchmarks.pie_bench`)
Pair features: id, instruction, task (text), source / target (Image: the raw files' bytes), mask (bytes: the records'
PNG, b"" when the pair has none). Every pair passes `records.to_record` (both images decode, non-empty instruction);
skipped pairs are counted and logged as in `build`.
Benchmark features: id, instruction, source_caption, target_caption, category, extra (JSON text), source (Image,
PNG), mask (bytes, b"" without one).

Reading without TensorFlow: `tfds.data_source(name, split=..., data_dir=OUT)`. Elsewhere in this project a TFDS build
is named `tfds:NAME@DATA_DIR` wherever record datasets are accepted: training `data.paths` / `eval_data.paths`
(`records.Pairs` -> `PairSource`: records with the images as encoded bytes) and `evaluate --data` (`benchmark_samples`).
"""
import json
import logging
from typing import Iterator

import numpy as np
import tensorflow_datasets as tfds
from etils import epath
from PIL import Image

from data_pipelines import benchmarks, imgedit, records, seed_edit

log = logging.getLogger("data_pipelines")
VERSION = tfds.core.Version("1.0.0")


def parse_spec(spec: str) -> tuple[str, str]:
    """"tfds:NAME@DATA_DIR" -> (NAME, DATA_DIR); raises ValueError for another form."""
    name, sep, data_dir = spec.removeprefix("tfds:").partition("@")
    if not spec.startswith("tfds:") or not sep or not name or not data_dir:
        raise ValueError(f"a TFDS dataset is named tfds:NAME@DATA_DIR, got {spec!r}")
    return name, data_dir


def _split(name: str, data_dir: str, splits) -> str:
    for split in ("train", "test"):
        if split in splits:
            return split
    raise ValueError(f"TFDS dataset {name} in {data_dir} has no train or test split ({sorted(splits)})")


def _builder(spec: str):
    name, data_dir = parse_spec(spec)
    try:
        builder = tfds.builder(name, data_dir=data_dir)
    except Exception as e:  # TFDS raises DatasetNotFoundError / registered-name errors of its own types
        raise FileNotFoundError(f"no TFDS dataset {name!r} in {data_dir}: {e}") from e
    if not builder.is_prepared():
        raise FileNotFoundError(f"TFDS dataset {name!r} is not built in {data_dir}: run python -m "
                                f"data_pipelines.tfds_build --builder {name} --manual_dir RAW --data_dir {data_dir}")
    return builder, _split(name, data_dir, builder.info.splits)


def _text(value) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


class PairSource:
    """Random access to a TFDS pair dataset ("tfds:NAME@DATA_DIR"): item i -> a record dict (`records` schema v1,
    images as their encoded bytes, mask PNG bytes or None). Picklable (grain worker processes)."""

    def __init__(self, spec: str):
        self.spec = spec
        builder, self.split = _builder(spec)
        if not {"source", "target", "instruction"} <= set(builder.info.features):
            raise ValueError(f"{spec} is not an edit-pair dataset (features {sorted(builder.info.features)})")
        skip = tfds.decode.SkipDecoding()
        self.source = builder.as_data_source(self.split, decoders={"source": skip, "target": skip})

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> dict:
        ex = self.source[index]
        return dict(id=_text(ex["id"]), instruction=_text(ex["instruction"]), source=ex["source"],
                    target=ex["target"], mask=ex["mask"] or None, task=_text(ex["task"]))

    def __repr__(self) -> str:
        return f"PairSource({self.spec!r}, split={self.split!r})"


def benchmark_samples(spec: str, skips: benchmarks.Skips | None = None) -> Iterator[benchmarks.Sample]:
    """The `benchmarks.Sample`s of a TFDS benchmark build (emu_edit / pie_bench)."""
    builder, split = _builder(spec)
    source = builder.as_data_source(split)
    for i in range(len(source)):
        ex = source[i]
        mask = records.decode_mask(ex["mask"]) if ex["mask"] else None
        yield benchmarks.Sample(_text(ex["id"]), np.asarray(ex["source"]), _text(ex["instruction"]),
                                _text(ex["source_caption"]), _text(ex["target_caption"]), mask,
                                _text(ex["category"]), json.loads(_text(ex["extra"])))


# ------------------------------------------------------------------------------------------------------ builders
def _mask_feature():
    return tfds.features.Scalar(dtype=np.object_, doc="PNG (mode L) of the edit mask, 1 = edited; b'' if none")


class _PairBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Edit pairs of a `data_pipelines` reader (`reader(manual_dir)`), validated by `records.to_record`."""
    VERSION = VERSION
    HOMEPAGE = ""

    def reader(self, root: str):
        raise NotImplementedError

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(builder=self, description=self.__doc__, homepage=self.HOMEPAGE,
                                     disable_shuffling=True, features=tfds.features.FeaturesDict({
                                         "id": tfds.features.Text(), "instruction": tfds.features.Text(),
                                         "task": tfds.features.Text(),
                                         "source": tfds.features.Image(shape=(None, None, 3)),
                                         "target": tfds.features.Image(shape=(None, None, 3)),
                                         "mask": _mask_feature()}))

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples(str(dl_manager.manual_dir))}

    def _generate_examples(self, root: str):
        reader, skipped = self.reader(root), {}
        for unit in reader.units():
            for item in reader.read(unit):
                outcome = item if isinstance(item, records.Skip) else records.to_record(item)
                if isinstance(outcome, (records.Skip, records.Filtered)):
                    skipped[outcome.reason] = skipped.get(outcome.reason, 0) + 1
                    log.info("skip %s: %s %s", outcome.id, outcome.reason, outcome.detail)
                    continue
                rec = records.decode_record(outcome)
                yield rec["id"], dict(id=rec["id"], instruction=rec["instruction"], task=rec["task"],
                                      source=rec["source"], target=rec["target"], mask=rec["mask"] or b"")
        log.warning("%s: skipped %s", self.name, skipped or "none")


class SeedEdit(_PairBuilder):
    """SEED-Data-Edit (AILab-CVC; CC-BY-NC-4.0) single-turn pairs, multi-turn sequences decomposed."""
    HOMEPAGE = "https://huggingface.co/AILab-CVC"
    MANUAL_DOWNLOAD_INSTRUCTIONS = """
    Download the parts you want from the Hugging Face repos AILab-CVC/SEED-Data-Edit-Part1-Openimages,
    -Part1-Unsplash and -Part2-3 (annotations/*.jsonl and the split image archives), reassemble and extract each
    archive (`cat x.tar.gz.part-* | tar -xz`) next to its annotations, and pass the folder holding the parts as
    --manual_dir (see data_pipelines/seed_edit.py for the layouts read).
    """

    def reader(self, root: str):
        return seed_edit.Reader(root)


class Imgedit(_PairBuilder):
    """ImgEdit (PKU-YuanGroup) single-turn pairs."""
    HOMEPAGE = "https://huggingface.co/datasets/sysuyy/ImgEdit"
    MANUAL_DOWNLOAD_INSTRUCTIONS = """
    Download sysuyy/ImgEdit from Hugging Face (Parquet/*.parquet and the Singleturn/*.tar.split.* pieces),
    reassemble and extract the archives (`cat a.tar.split.* | tar -x -C Singleturn`), and pass the dataset root
    (holding Parquet/ and Singleturn/) as --manual_dir (see data_pipelines/imgedit.py).
    """

    def reader(self, root: str):
        return imgedit.Reader(root)


class _BenchmarkBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Samples of a `benchmarks` loader (`load(manual_dir, skips)`), split "test"."""
    VERSION = VERSION
    HOMEPAGE = ""

    def load(self, root: str, skips: benchmarks.Skips):
        raise NotImplementedError

    def _info(self) -> tfds.core.DatasetInfo:
        text = tfds.features.Text
        return tfds.core.DatasetInfo(builder=self, description=self.__doc__, homepage=self.HOMEPAGE,
                                     disable_shuffling=True, features=tfds.features.FeaturesDict({
                                         "id": text(), "instruction": text(), "source_caption": text(),
                                         "target_caption": text(), "category": text(), "extra": text(),
                                         "source": tfds.features.Image(shape=(None, None, 3), encoding_format="png"),
                                         "mask": _mask_feature()}))

    def _split_generators(self, dl_manager):
        return {"test": self._generate_examples(str(dl_manager.manual_dir))}

    def _generate_examples(self, root: str):
        skips = benchmarks.Skips()
        for s in self.load(root, skips):
            yield s.id, dict(id=s.id, instruction=s.instruction, source_caption=s.source_caption,
                             target_caption=s.target_caption, category=s.category,
                             extra=json.dumps(s.extra, ensure_ascii=False), source=Image.fromarray(s.source),
                             mask=records.encode_png(s.mask) if s.mask is not None else b"")
        log.warning("%s: skipped %s", self.name, skips.summary())


class EmuEdit(_BenchmarkBuilder):
    """EMU-Edit test set (facebook/emu_edit_test_set, the 3,589-sample test split; CC-BY-NC-4.0)."""
    HOMEPAGE = "https://huggingface.co/datasets/facebook/emu_edit_test_set"
    MANUAL_DOWNLOAD_INSTRUCTIONS = """
    Download the Hugging Face dataset facebook/emu_edit_test_set (its data/test-*.parquet files) and pass the
    folder holding data/ as --manual_dir.
    """

    def load(self, root, skips):
        return benchmarks.emu_edit(root, "test", skips)


class PieBench(_BenchmarkBuilder):
    """PIE-Bench (cure-lab/PnPInversion): 700 images with instructions, captions and edit masks."""
    HOMEPAGE = "https://github.com/cure-lab/PnPInversion"
    MANUAL_DOWNLOAD_INSTRUCTIONS = """
    Request PIE-Bench through the form linked from cure-lab/PnPInversion's README, extract it, and pass the folder
    holding mapping_file.json and annotation_images/ (or its parent with data/) as --manual_dir.
    """

    def load(self, root, skips):
        return benchmarks.pie_bench(root, skips)


BUILDERS = {b.name: b for b in (SeedEdit, Imgedit, EmuEdit, PieBench)}


def build(name: str, manual_dir, data_dir) -> str:
    """Builds TFDS dataset `name` from the raw files in `manual_dir` into `data_dir`; returns its folder."""
    if name not in BUILDERS:
        raise ValueError(f"unknown builder {name!r}; choose from {', '.join(BUILDERS)}")
    if not epath.Path(manual_dir).is_dir():
        raise FileNotFoundError(f"--manual_dir {manual_dir} does not exist ({BUILDERS[name].__name__}: "
                                f"{' '.join(BUILDERS[name].MANUAL_DOWNLOAD_INSTRUCTIONS.split())})")
    builder = BUILDERS[name](data_dir=str(data_dir), file_format="array_record")
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=str(manual_dir)))
    return str(builder.data_path)
