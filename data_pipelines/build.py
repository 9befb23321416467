"""Builds a record dataset (see `data_pipelines.records`) from a raw edit dataset.

  python -m data_pipelines.build --format {seed_edit,imgedit,webdataset,jsonl,parquet,toy} --src PATH --out DIR
      [--num N] [--filter-scores FILE --min-score X] [--min-side PX] [--max-aspect R] [--shard-size K]
  python -m data_pipelines.build --format jsonl --src pairs.jsonl --out DIR      # your own pairs (`pairs`)
  python -m data_pipelines.build --format parquet --src DIR --out DIR [--columns source=A,target=B,instruction=C]
  python -m data_pipelines.build --format toy --out DIR --num N [--size 64] [--seed S]

Re-running the same command after an interruption finishes the build: committed chunks are kept, their pairs are
not read again, uncommitted output is discarded and redone (no duplicates, nothing lost). `--num N` caps the number
of records in DIR (a re-run with a larger N extends it). Missing or corrupt images, empty instructions and bad
annotation rows are skipped, logged with their record id and counted by reason; the quality filter drops pairs
whose score is below `--min-score` or missing. Exit code 2 on bad input (flags, paths, an option mismatch with a
previous build into DIR).
"""
import argparse
import collections
import logging
import os
import sys
import time

from data_pipelines import imgedit, pairs, seed_edit, toy, webdataset
from data_pipelines.records import DUPLICATE_ID, BuildDir, Checks, Filtered, Scores, Skip, to_record
from varedit_jax import storage

FORMATS = ("seed_edit", "imgedit", "webdataset", "jsonl", "parquet", "toy")
log = logging.getLogger("data_pipelines")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The build flags (shared with `data_pipelines.beam`)."""
    parser.add_argument("--format", required=True, choices=FORMATS, help="raw dataset layout")
    parser.add_argument("--src", help="raw dataset path (not for --format toy)")
    parser.add_argument("--out", required=True, help="output dataset directory (local or gs://)")
    parser.add_argument("--num", type=int, help="at most N records in the output (required for toy)")
    parser.add_argument("--filter-scores", help="JSON {id: score} or JSONL {id, score} of per-pair quality scores")
    parser.add_argument("--min-score", type=float, help="keep pairs with score >= X (with --filter-scores)")
    parser.add_argument("--min-side", type=int, default=0, help="skip pairs with an image side below PX")
    parser.add_argument("--max-aspect", type=float, help="skip pairs with an image aspect ratio (long/short) above R")
    parser.add_argument("--imgedit-multiturn", action="store_true", help="also read ImgEdit multi-turn parquets")
    parser.add_argument("--columns", help="--format parquet: ROLE=COLUMN,... for the roles source, target, "
                        "instruction [, mask] (default: columns named after the roles)")
    parser.add_argument("--size", type=int, default=64, help="toy image size in px")
    parser.add_argument("--seed", type=int, default=0, help="toy dataset seed")
    parser.add_argument("--shard-size", type=int, default=1000, help="records per shard (and per commit)")


def validate(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if (args.filter_scores is None) != (args.min_score is None):
        parser.error("--filter-scores and --min-score go together")
    if args.format == "toy":
        if args.num is None:
            parser.error("--format toy needs --num")
        if args.src is not None:
            parser.error("--format toy takes no --src")
    elif args.src is None:
        parser.error(f"--format {args.format} needs --src")
    if args.num is not None and args.num < 1:
        parser.error("--num must be >= 1")
    if args.shard_size < 1:
        parser.error("--shard-size must be >= 1")
    if args.columns is not None and args.format != "parquet":
        parser.error("--columns goes with --format parquet")


def make_reader(args: argparse.Namespace):
    if args.format == "seed_edit":
        return seed_edit.Reader(args.src)
    if args.format == "imgedit":
        return imgedit.Reader(args.src, include_multiturn=args.imgedit_multiturn)
    if args.format == "webdataset":
        return webdataset.Reader(args.src)
    if args.format == "jsonl":
        return pairs.JsonlReader(args.src)
    if args.format == "parquet":
        return pairs.ParquetReader(args.src, pairs.parse_columns(args.columns))
    return toy.Reader(args.num, size=args.size, seed=args.seed)


def options(args: argparse.Namespace) -> dict:
    """What defines the dataset in DIR (stored in build.json; --num and --shard-size may change between runs)."""
    return {"format": args.format, "src": os.fspath(storage.path(args.src)) if args.src else None,
            **({"columns": args.columns} if args.format == "parquet" else {}),
            "filter_scores": os.fspath(storage.path(args.filter_scores)) if args.filter_scores else None,
            "min_score": args.min_score, "min_side": args.min_side, "max_aspect": args.max_aspect,
            "imgedit_multiturn": args.imgedit_multiturn if args.format == "imgedit" else None,
            "size": args.size if args.format == "toy" else None, "seed": args.seed if args.format == "toy" else None}


def log_outcome(outcome: Skip | Filtered) -> None:
    kind = "skip" if isinstance(outcome, Skip) else "filter"
    log.info("%s %s: %s%s", kind, outcome.id, outcome.reason, f" ({outcome.detail})" if outcome.detail else "")


def build(reader, out: str, opts: dict, *, num: int | None = None, checks: Checks = Checks(),
          scores: Scores | None = None, shard_size: int = 1000, progress_every: float = 30.0) -> dict:
    """Builds (or finishes building) DIR `out`; returns {"run": counts of this run, "dataset": dataset.json}."""
    state = BuildDir(out, opts)
    previous = frozenset(state.done_ids)
    written = already_done = 0
    skip_reasons, filter_reasons = collections.Counter(), collections.Counter()
    records, skipped, filtered = [], [], []
    last_report = time.monotonic()

    def commit():
        state.commit(records, skipped, filtered)
        records.clear()
        skipped.clear()
        filtered.clear()

    def full():
        return num is not None and state.num_written + len(records) >= num

    for unit in reader.units():
        if full():
            break
        for item in reader.read(unit):
            if full():
                break
            if item.id in previous:
                already_done += 1
                continue
            if item.id in state.done_ids:  # a reader yielding an id twice: the first occurrence counts
                outcome = Skip(item.id, DUPLICATE_ID)
            else:
                state.done_ids.add(item.id)
                outcome = item if isinstance(item, Skip) else to_record(item, checks, scores)
            if isinstance(outcome, Skip):
                skipped.append(outcome)
                skip_reasons[outcome.reason] += 1
                log_outcome(outcome)
            elif isinstance(outcome, Filtered):
                filtered.append(outcome)
                filter_reasons[outcome.reason] += 1
                log_outcome(outcome)
            else:
                records.append((item.id, outcome))
                written += 1
            if len(records) >= shard_size:
                commit()
            if time.monotonic() - last_report > progress_every:
                last_report = time.monotonic()
                log.info("progress: written %d, skipped %d, filtered %d (unit %s)", written,
                            sum(skip_reasons.values()), sum(filter_reasons.values()), unit)
    commit()
    summary = state.finalize()
    return {"run": {"written": written, "already_done": already_done,
                    "skipped": dict(skip_reasons), "filtered": dict(filter_reasons)}, "dataset": summary}


def report(result: dict) -> str:
    run, ds = result["run"], result["dataset"]
    lines = [f"written {run['written']}, skipped {sum(run['skipped'].values())}, "
             f"filtered {sum(run['filtered'].values())} pairs in this run"
             + (f" ({run['already_done']} already done)" if run["already_done"] else "")]
    for what in ("skipped", "filtered"):
        if run[what]:
            lines.append(f"  {what}: " + ", ".join(f"{r} {n}" for r, n in sorted(run[what].items())))
    lines.append(f"dataset: {ds['num_records']} records in {len(ds['shards'])} shards; skipped "
                 f"{sum(ds['skipped'].values())}, filtered {sum(ds['filtered'].values())} in total")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m data_pipelines.build", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    args = parser.parse_args(argv)
    validate(parser, args)
    log.setLevel(logging.INFO)
    try:
        storage.check_reachable(args.out)
        reader = make_reader(args)
        scores = Scores(args.filter_scores, args.min_score) if args.filter_scores else None
        result = build(reader, args.out, options(args), num=args.num, scores=scores, shard_size=args.shard_size,
                       checks=Checks(args.min_side, args.max_aspect))
    except (FileNotFoundError, ValueError, ImportError, storage.StorageError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(report(result))
    return 0


def cli_logging() -> None:
    """Plain "message" lines on stderr (replacing handlers that imported libraries installed on the root logger)."""
    logging.basicConfig(format="%(message)s", stream=sys.stderr, force=True)


if __name__ == "__main__":
    cli_logging()
    sys.exit(main())
