"""Input pipeline throughput: decoded + resized edit pairs per second per CPU core, records vs WebDataset tars.

  python benchmarks/data.py [--pairs 48] [--height 480 --width 640] [--min-seconds 2] [--out data.json]

Generates photo-like JPEG pairs, writes them once as a WebDataset tar shard (the official trainer's layout) and once
as a record dataset built from that shard (`data_pipelines.build`), then measures in one process (= one core), side
by side in the same run, alternating the two readers: read -> decode both images -> target to source size ->
LANCZOS cover-resize + centre crop -> [-1, 1] float32 (`varedit_jax.data.preprocess`), at 256 and 512 px. Also
reports the read-only rate (no decoding) of both. Prints JSON (and writes it to --out).
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
from varedit_jax import data


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, default=48)
    parser.add_argument("--height", type=int, default=480)
    parser.add_argument("--width", type=int, default=640)
    parser.add_argument("--min-seconds", type=float, default=2.0, help="per measurement")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds; the best rate of each is kept")
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
