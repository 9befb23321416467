"""Training input pipeline: record datasets (`data_pipelines.records`) -> per-step batches of edit pairs.

`config.paths` holds record dataset directories and / or TFDS builds named "tfds:NAME@DATA_DIR"
(`data_pipelines.tfds_builders`, e.g. "tfds:seed_edit@/data/tfds"), read in order as one dataset (`records.Pairs`).

Pipeline (grain Dataset API; every process builds the same global order from the same seed):

  MapDataset.range(num_records).shuffle(seed).repeat(num_epochs)   global order of record indices (reshuffled
                                                                   every epoch)
  [process_index::process_count]                                   this process's disjoint slice
  .map_with_index(LoadPair)          element i: read + decode the record, preprocess it at the template of step
                                     i // local_batch_size, tokenize the instruction to a static length; a record
                                     failing any of it is replaced by the next one
  .to_iter_dataset(ReadOptions)      threaded prefetch
  .mp_prefetch(...)                  worker processes when config.num_workers > 0 (before batching, so the batches
                                     do not depend on the number of workers)
  .batch(local_batch_size, drop_remainder=True)

Preprocessing as the official trainer (`infinity/dataset/webdataset.py`): decode to RGB; the target is resized to
the source size (PIL's default filter for RGB, bicubic); both are LANCZOS-resized to cover the template's pixel size
(aspect kept, sides truncated to int) and centre-cropped; values x / 255 * 2 - 1 in float32. The edit mask (toy
data) follows the same geometry with nearest-neighbour resizing.

One aspect template per step (static shapes): `template_for_step(seed, step, templates)`, a function of (seed, step)
only, so all processes agree (the official trainer uses the square template: `templates=("1.0",)`). The pixel size
is `pixel_size(scale_schedule(template, pn), stride)`.

A local batch (numpy, leading dim = batch_size // process_count):
  source, target  float32 (B, H, W, 3) in [-1, 1]
  mask            uint8 (B, H, W), 1 = pixel changed by the edit (zeros where has_mask is False)
  has_mask        bool (B,)
  text_ids        int32 (B, T); text_mask bool (B, T)   (T = config.max_text_len)
  num_replaced    int32 (B,): records that failed to load and were replaced for this element
  replaced_by     int32 (B, len(CAUSES)): the same per cause (read, decode, text); the trainer sums it over
                  processes into the `data/replaced*` metrics and stops above `max_bad_fraction`
  id, instruction numpy str (B,)                         host-only, kept as numpy by `global_batch`
Iterator state: `iter(ds).get_state()` / `set_state()`, or `grain.checkpoint.CheckpointSave(iterator)` in an orbax
CheckpointManager; restoring gives exactly the same next batches.
"""
import io
import logging
import zlib
from typing import Callable, Sequence

import grain
import jax
import ml_collections
import numpy as np
from jax.experimental import multihost_utils
from PIL import Image

from data_pipelines import records
from data_pipelines.records import Pairs
from varedit_jax import images, schedules, storage

log = logging.getLogger(__name__)
MAX_REPLACEMENTS = 64  # consecutive undecodable records before the pipeline gives up (a broken dataset, not noise)
CAUSES = ("read", "decode", "text")  # why a record was replaced: its bytes, its images / schema, its instruction
LOGGED_REPLACEMENTS = 10  # per reader: the first ones are logged one by one, the rest only counted
HOST_ONLY = ("id", "instruction")

Tokenizer = Callable[[Sequence[str], int], tuple[np.ndarray, np.ndarray]]


def default_config() -> ml_collections.ConfigDict:
    """The `config.data` fields `make_dataset` reads."""
    c = ml_collections.ConfigDict()
    c.paths = ()                # record dataset dirs / "tfds:NAME@DATA_DIR" (concatenated, as the official SEED + ImgEdit)
    c.pn = "0.06M"              # size class: 0.06M (256 px with stride 16), 0.25M (512), 0.60M (768), 1M (1024)
    c.stride = schedules.OFFICIAL_STRIDE  # tokenizer pixels per latent cell (16 official, 4 for the toy tokenizer)
    c.templates = ("1.0",)      # aspect templates (h/w) drawn per step; the official trainer uses only 1.0
    c.spiece_model = ""         # sentencepiece model of the text encoder
    c.max_text_len = 512        # static token length (official: 512)
    c.shuffle = True
    c.num_epochs = None         # None: repeat forever
    c.read_threads = -1         # record-reading threads (-1: 16 for gs:// datasets, whose reads wait on the network; 4)
    c.stage_dir = ""            # copy gs:// datasets to this local folder first (refused when they exceed its free disk)
    c.prefetch_buffer_size = 32
    c.num_workers = 0           # mp_prefetch worker processes (0: none)
    c.worker_buffer_size = 2
    c.max_bad_fraction = 0.01   # replaced / read records (all processes) above which training stops, once >= 50 read
    return c


def image_size(template: str, pn: str, stride: int) -> tuple[int, int]:
    """(H, W) pixel size of a template at size class `pn` for a tokenizer of the given stride."""
    return schedules.pixel_size(schedules.scale_schedule(template, pn), stride)


def template_for_step(seed: int, step: int, templates: Sequence[str]) -> str:
    """The aspect template of global step `step`: uniform over `templates`, a function of (seed, step) only."""
    if len(templates) == 1:
        return templates[0]
    return templates[int(np.random.default_rng([seed, step]).integers(len(templates)))]




def preprocess(record: dict, size: tuple[int, int]) -> dict:
    """One decoded record -> an example at pixel size `size` = (H, W) (fields as in the module docstring)."""
    src = Image.open(io.BytesIO(record["source"])).convert("RGB")
    tgt = Image.open(io.BytesIO(record["target"])).convert("RGB")
    if tgt.size != src.size:
        tgt = tgt.resize(src.size, resample=Image.Resampling.BICUBIC)  # the official call uses PIL's default
    if record["mask"] is not None:
        mask_img = Image.open(io.BytesIO(record["mask"])).convert("L")
        if mask_img.size != src.size:
            mask_img = mask_img.resize(src.size, resample=Image.Resampling.NEAREST)
        mask = images.cover_resize(mask_img, size, Image.Resampling.NEAREST)
    else:
        mask = np.zeros(size, np.uint8)
    return {"source": images.to_model_range(images.cover_resize(src, size, Image.Resampling.LANCZOS)),
            "target": images.to_model_range(images.cover_resize(tgt, size, Image.Resampling.LANCZOS)),
            "mask": mask, "has_mask": np.bool_(record["mask"] is not None),
            "id": record["id"], "instruction": record["instruction"]}


class TooMuchBadData(RuntimeError):
    """More than `max_bad_fraction` of the records read so far failed to load."""


def replaced_counts(local_batch: dict) -> np.ndarray:
    """(len(CAUSES),) int64: replaced records of this step summed over the local batch and every process."""
    local = np.asarray(local_batch["replaced_by"], np.int64).reshape(-1, len(CAUSES)).sum(0)
    if jax.process_count() == 1:
        return local
    return np.asarray(multihost_utils.process_allgather(local)).reshape(-1, len(CAUSES)).sum(0)


def batch_digest(local_ids) -> int:
    """A digest of the records of a global batch, the same however they are split over processes: the sum of the
    crc32 of every record id (all processes), mod 2**32. Two runs read the same pairs at a step iff (almost surely)
    their digests agree."""
    local = np.int64(sum(zlib.crc32(str(i).encode()) for i in np.asarray(local_ids).reshape(-1)))
    if jax.process_count() > 1:
        local = np.asarray(multihost_utils.process_allgather(local)).sum()
    return int(local % 2 ** 32)


def check_bad_fraction(read: int, replaced: int, max_fraction: float) -> None:
    """Raises TooMuchBadData when replaced / read > max_fraction once at least 50 records were read."""
    if read >= 50 and replaced > max_fraction * read:
        raise TooMuchBadData(f"{replaced} of the {read} records read so far failed to load ({replaced / read:.1%} > "
                             f"data.max_bad_fraction {max_fraction:.1%}): check the dataset (python -m "
                             f"data_pipelines.describe DIR), or raise data.max_bad_fraction")


class _Failed(Exception):
    """A record that failed to load: `cause` (one of CAUSES) and what went wrong."""

    def __init__(self, cause: str, detail: str):
        super().__init__(cause, detail)
        self.cause, self.detail = cause, detail


class LoadPair:
    """map_with_index transform: (element index i, record index) -> example at the template of step i // B.

    Reads, decodes, preprocesses the record and tokenizes its instruction. A record that fails any of these is
    replaced by the next record of the dataset (deterministic), counted in the example's `num_replaced` and
    `replaced_by` (per cause), and logged (the first `LOGGED_REPLACEMENTS` of each reader).
    """

    def __init__(self, paths: Sequence[str], *, seed: int, local_batch: int, templates: Sequence[str], pn: str,
                 stride: int, tokenizer: Tokenizer, max_text_len: int):
        self.records = Pairs(list(paths))
        self.seed, self.local_batch, self.templates = seed, local_batch, tuple(templates)
        self.sizes = {t: image_size(t, pn, stride) for t in self.templates}
        self.tokenizer, self.max_text_len = tokenizer, max_text_len
        self.logged = 0

    def example(self, record_index: int, size: tuple[int, int]) -> dict:
        """The example of one record; a failure raises `_Failed` with its cause (one of CAUSES)."""
        stage = "read"
        try:
            data = self.records[record_index]
            stage = "decode"
            example = preprocess(Pairs.decode(data), size)
            stage = "text"
            ids, mask = self.tokenizer([example["instruction"]], self.max_text_len)
        except Exception as e:  # corrupt data surfaces as many exception types (PIL, msgpack, tokenizer, ...)
            raise _Failed(stage, f"{type(e).__name__}: {e}") from e
        example["text_ids"], example["text_mask"] = np.asarray(ids[0], np.int32), np.asarray(mask[0], bool)
        return example

    def __call__(self, index: int, record_index: int) -> dict:
        size = self.sizes[template_for_step(self.seed, index // self.local_batch, self.templates)]
        n = len(self.records)
        replaced_by, last = np.zeros(len(CAUSES), np.int32), None
        for attempt in range(MAX_REPLACEMENTS + 1):
            i = (int(record_index) + attempt) % n
            try:
                example = self.example(i, size)
            except _Failed as e:
                replaced_by[CAUSES.index(e.cause)] += 1
                self._log(i, e, (i + 1) % n)
                last = e
                continue
            example["num_replaced"], example["replaced_by"] = np.int32(attempt), replaced_by
            return example
        raise ValueError(f"{MAX_REPLACEMENTS + 1} consecutive records from index {record_index} failed to load "
                         f"(last: {last.cause}: {last.detail}): the dataset is broken, not noisy")

    def _log(self, i: int, failure: _Failed, replacement: int) -> None:
        self.logged += 1
        if self.logged <= LOGGED_REPLACEMENTS:
            log.warning("record %d failed to load (%s: %s); replacing it with record %d", i, failure.cause,
                        failure.detail, replacement)
        if self.logged == LOGGED_REPLACEMENTS:
            log.warning("further replaced records are counted (data/replaced* metrics), not logged")


def _ensure_absl_flags_parsed() -> None:
    """grain workers read absl flags; outside an absl app (tests, notebooks) they are unparsed (defaults apply)."""
    from absl import flags
    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


def make_dataset(config: ml_collections.ConfigDict, *, seed: int, batch_size: int, process_index: int | None = None,
                 process_count: int | None = None, tokenizer: Tokenizer | None = None) -> grain.IterDataset:
    """This process's stream of local batches (see the module docstring).

    Args:
      config: the data config (`default_config()` fields).
      seed: shuffle and template seed; the same on every process.
      batch_size: GLOBAL batch size; each process yields batch_size // process_count examples per step.
      process_index, process_count: this process's slice (default `jax.process_index()` / `jax.process_count()`).
      tokenizer: `(texts, max_length) -> (ids (B, T), mask (B, T))`, picklable when num_workers > 0; default
        `varedit_jax.text.TextTokenizer(config.spiece_model)`.
    """
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} outside [0, {process_count})")
    if batch_size % process_count or batch_size < process_count:
        raise ValueError(f"global batch size {batch_size} is not a positive multiple of {process_count} processes")
    local_batch = batch_size // process_count
    templates = tuple(config.templates)
    if not templates:
        raise ValueError("config.templates is empty")
    paths = [config.paths] if isinstance(config.paths, str) else list(config.paths)
    remote = any(storage.is_remote(p) for p in paths)
    if config.stage_dir:
        paths = [records.stage(p, config.stage_dir) for p in paths]
    threads = config.read_threads if config.read_threads > 0 else (16 if remote and not config.stage_dir else 4)
    if tokenizer is None:
        from varedit_jax.text import TextTokenizer
        tokenizer = TextTokenizer(config.spiece_model)
    load = LoadPair(paths, seed=seed, local_batch=local_batch, templates=templates, pn=config.pn,
                    stride=config.stride, tokenizer=tokenizer, max_text_len=config.max_text_len)

    order = grain.MapDataset.range(len(load.records))
    if config.shuffle:
        order = order.shuffle(seed=seed)
    order = order.repeat(config.num_epochs)
    if config.num_epochs is not None:  # equal lengths on every process, so all run the same number of steps
        order = order[:len(order) // process_count * process_count]
    ds = order[process_index::process_count].map_with_index(load)
    ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=threads, prefetch_buffer_size=config.prefetch_buffer_size))
    if config.num_workers > 0:
        _ensure_absl_flags_parsed()
        ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=config.num_workers,
                                                         per_worker_buffer_size=config.worker_buffer_size))
    return ds.batch(local_batch, drop_remainder=True)


def resplit_state(states: dict[int, dict], process_count: int, config: ml_collections.ConfigDict) -> dict:
    """The iterator state that continues, on each of `process_count` processes, where a run of `len(states)`
    processes stopped (their saved states by process index). Process p of n reads the global order's elements p,
    p + n, ...; all processes read the same number k of them, so k * n elements were read in all, and each new
    process starts at local index k * n / process_count: no pair is repeated or lost. Needs `num_workers` 0 (a plain
    `next_index` state) and `num_epochs` None (a finite order is cut to a multiple of the process count)."""
    old = len(states)
    if config.num_workers > 0 or config.num_epochs is not None or any("next_index" not in s for s in states.values()):
        raise ValueError(f"the checkpoint was written by {old} processes and this run has {process_count}: "
                         f"re-splitting the data position needs data.num_workers=0 and data.num_epochs=None; resume "
                         f"with {old} processes")
    counts = {int(s["next_index"]) for s in states.values()}
    if len(counts) != 1:
        raise ValueError(f"the {old} processes that wrote the checkpoint stopped at different data positions {counts}")
    total = counts.pop() * old
    if total % process_count:
        raise ValueError(f"{total} elements read by {old} processes cannot be split over {process_count}")
    return {"next_index": total // process_count}


def global_batch(local_batch: dict, sharding: jax.sharding.Sharding) -> dict:
    """The global batch of a step from every process's local batch.

    Numeric fields become global `jax.Array`s (leading dim = global batch) via
    `jax.make_array_from_process_local_data(sharding, x)`; `sharding` shards the batch dim (e.g.
    `NamedSharding(mesh, P("data"))`), trailing dims are replicated. String fields (`HOST_ONLY`) stay local numpy.
    """
    return {k: (np.asarray(v) if k in HOST_ONLY else jax.make_array_from_process_local_data(sharding, np.asarray(v)))
            for k, v in local_batch.items()}
