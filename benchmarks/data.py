"""Input pipeline throughput: decoded + resized edit pairs per second per CPU core, records vs WebDataset tars; with
`--gcs`, the training pipeline's records per second per host reading the same dataset from gs:// (a GCS emulator on
127.0.0.1, started here) vs local disk.

  python benchmarks/data.py [--pairs 48] [--height 480 --width 640] [--min-seconds 2] [--gcs] [--out data.json]

Generates photo-like JPEG pairs, writes them once as a WebDataset tar shard (the official trainer's layout) and once
as a record dataset built from that shard (`data_pipelines.build`), then measures in one process (= one core), side
by side in the same run, alternating the two readers: read -> decode both images -> target to source size ->
LANCZOS cover-resize + centre crop -> [-1, 1] float32 (`varedit_jax.data.preprocess`), at 256 and 512 px. Also
reports the read-only rate (no decoding) of both. `--gcs`: the same records copied to the emulator, then, alternating
gs:// and local: random single-record reads, and `varedit_jax.data.make_dataset` batches (global shuffle, read
threads: 16 for gs://, 4 locally, decode + preprocess at 256 px). The emulator has no network latency: real GCS reads
are slower per request, which the read threads are there to hide. Prints JSON (and writes it to --out).
"""
import argparse
import io
import json
import os
import pathlib
import tempfile
import time

import numpy as np
import PIL
from PIL import Image

import common
from data_pipelines import build, records, webdataset
from varedit_jax import data, storage


def photo_like(rng: np.random.Generator, h: int, w: int) -> bytes:
    """A JPEG (quality 90) of smooth colour fields plus texture, compressing like a photograph."""
    coarse = rng.integers(0, 256, (h // 32 + 2, w // 32 + 2, 3), dtype=np.uint8)
    base = np.asarray(Image.fromarray(coarse).resize((w, h), Image.Resampling.BICUBIC), np.int16)
    texture = rng.normal(0, 12, (h, w, 3))
    buf = io.BytesIO()
    Image.fromarray(np.clip(base + texture, 0, 255).astype(np.uint8)).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def make_data(folder: str, pairs: int, h: int, w: int) -> tuple[str, str]:
    rng = np.random.default_rng(0)
    samples = [(f"{i:06d}", {"src.jpg": photo_like(rng, h, w), "tgt.jpg": photo_like(rng, h, w),
                             "txt": f"edit number {i}".encode()}) for i in range(pairs)]
    tar_dir, rec_dir = os.path.join(folder, "wds"), os.path.join(folder, "records")
    os.makedirs(tar_dir)
    webdataset.write_shard(os.path.join(tar_dir, "wds_bench_0000.tar"), samples)
    result = build.build(webdataset.Reader(tar_dir), rec_dir, {"format": "webdataset"}, shard_size=pairs)
    assert result["dataset"]["num_records"] == pairs, result
    return os.path.join(tar_dir, "wds_bench_0000.tar"), rec_dir


def records_pass(rec_dir: str, size) -> int:
    source = records.open_records(rec_dir)
    for i in range(len(source)):
        record = records.decode_record(source[i])
        if size is not None:
            data.preprocess(record, size)
    return len(source)


def tar_pass(tar_path: str, size) -> int:
    n = 0
    for key, sample in webdataset.iter_samples(tar_path):
        record = {"id": key, "instruction": sample["txt"].decode("utf-8"), "source": sample["src.jpg"],
                  "target": sample["tgt.jpg"], "mask": None}
        if size is not None:
            data.preprocess(record, size)
        n += 1
    return n


def rate(fn, min_seconds: float) -> float:
    """Pairs per second of repeated passes, at least `min_seconds` long."""
    count, start = 0, time.perf_counter()
    while True:
        count += fn()
        elapsed = time.perf_counter() - start
        if elapsed >= min_seconds:
            return count / elapsed


def random_reads(paths: str, n: int = 400) -> int:
    """Random single-record reads (the training pipeline's access pattern)."""
    source = records.open_records(paths)
    for i in np.random.default_rng(0).integers(0, len(source), n):
        source[int(i)]
    return n


def pipeline_pass(path: str, seconds: float) -> float:
    """Pairs per second of the training input pipeline (batches of 8 at 256 px) over the dataset at `path`."""
    config = data.default_config()
    config.paths, config.max_text_len = (path,), 16
    tokenize = lambda texts, n: (np.zeros((len(texts), n), np.int32), np.ones((len(texts), n), bool))  # noqa: E731
    it = iter(data.make_dataset(config, seed=0, batch_size=8, tokenizer=tokenize))
    next(it)  # the threads' start-up
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        count += len(next(it)["id"])
    return count / (time.perf_counter() - start)


def gcs_results(rec_dir: str, rounds: int, min_seconds: float) -> dict:
    """Records read from the GCS emulator vs local disk (see the module docstring)."""
    import sys
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent / "tests"))
    import gcs_emulator
    with tempfile.TemporaryDirectory() as root:
        emulator = gcs_emulator.reserve(pathlib.Path(root)).start()
        try:
            remote = emulator.make_bucket("varedit-bench") + "/records"
            for f in storage.path(rec_dir).iterdir():
                if f.is_file():
                    f.copy(storage.path(remote) / f.name)
            best = {k: 0.0 for k in ("gcs_random", "local_random", "gcs_pipeline", "local_pipeline")}
            for _ in range(rounds):
                best["gcs_random"] = max(best["gcs_random"], rate(lambda: random_reads(remote), min_seconds))
                best["local_random"] = max(best["local_random"], rate(lambda: random_reads(rec_dir), min_seconds))
                best["gcs_pipeline"] = max(best["gcs_pipeline"], pipeline_pass(remote, min_seconds))
                best["local_pipeline"] = max(best["local_pipeline"], pipeline_pass(rec_dir, min_seconds))
        finally:
            emulator.stop()
    return {"random_reads_records_per_s": {"gcs_emulator": round(best["gcs_random"], 1),
                                           "local": round(best["local_random"], 1)},
            "pipeline_pairs_per_s_per_host_256px": {"gcs_emulator": round(best["gcs_pipeline"], 1),
                                                    "local": round(best["local_pipeline"], 1)},
            "ratio_gcs_over_local_pipeline": round(best["gcs_pipeline"] / best["local_pipeline"], 3),
            "note": "the emulator is on loopback: no network latency (real GCS is slower per request)"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, default=48)
    parser.add_argument("--height", type=int, default=480)
    parser.add_argument("--width", type=int, default=640)
    parser.add_argument("--min-seconds", type=float, default=2.0, help="per measurement")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds; the best rate of each is kept")
    parser.add_argument("--gcs", action="store_true", help="also gs:// (a local GCS emulator) vs local reads")
    parser.add_argument("--out", default=str(pathlib.Path(__file__).parent / "results" / "data.json"))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        tar_path, rec_dir = make_data(folder, args.pairs, args.height, args.width)
        sizes = {"read_only": None, "256": (256, 256), "512": (512, 512)}
        results = {}
        for name, size in sizes.items():
            best = {"records": 0.0, "webdataset": 0.0}
            for _ in range(args.rounds):  # alternate, so both see the same machine load
                best["records"] = max(best["records"], rate(lambda: records_pass(rec_dir, size), args.min_seconds))
                best["webdataset"] = max(best["webdataset"], rate(lambda: tar_pass(tar_path, size), args.min_seconds))
            results[name] = {"records_pairs_per_s_per_core": round(best["records"], 2),
                             "webdataset_pairs_per_s_per_core": round(best["webdataset"], 2),
                             "ratio_records_over_webdataset": round(best["records"] / best["webdataset"], 3)}
        tar_bytes = os.path.getsize(tar_path)
        if args.gcs:
            results["gcs"] = gcs_results(rec_dir, args.rounds, args.min_seconds)
    report = {
        "benchmark": "data: decoded + resized (LANCZOS cover + centre crop, [-1, 1]) edit pairs per second, one core",
        "setup": {"pairs": args.pairs, "source_size": [args.height, args.width], "jpeg_quality": 90,
                  "mean_pair_kib": round(tar_bytes / args.pairs / 1024, 1), "rounds": args.rounds,
                  "min_seconds": args.min_seconds, "pillow": PIL.__version__},
        "results": results,
    }
    print(json.dumps(report, indent=1))
    common.write(report, args.out)


if __name__ == "__main__":
    main()
