"""The build as an Apache Beam pipeline (the `beam` extra): DirectRunner locally, any runner at scale.

  python -m data_pipelines.beam --format F --src PATH --out DIR [build flags] [--num-shards K] [Beam options]

Same flags, output and resume semantics as `data_pipelines.build` (flags it does not know go to Beam's
PipelineOptions, e.g. `--runner=DataflowRunner --project=...`; default DirectRunner). The annotation units (files,
shards) are read in parallel; every pair goes to chunk `crc32(id) % K`; each chunk is written by one worker with
the same atomic commit as the local build (shard, then manifest), so an interrupted pipeline leaves only whole
chunks and a re-run redoes exactly the missing pairs. `--num` is supported for the toy format only (elsewhere the
first N pairs would need a global order); `--shard-size` is not used. The output directory must be reachable by
every worker.
"""
import argparse
import collections
import logging
import sys
import zlib

from data_pipelines import build as local_build
from data_pipelines.records import DUPLICATE_ID, BuildDir, Checks, Filtered, Scores, Skip, commit_chunk, to_record
from varedit_jax import storage

log = logging.getLogger("data_pipelines")


def _beam():
    try:
        import apache_beam
        from apache_beam.options.pipeline_options import PipelineOptions
    except ImportError as e:
        raise ImportError("the Beam build needs apache-beam: pip install 'varedit_jax[beam]'") from e
    return apache_beam, PipelineOptions


def _outcome(item, checks: Checks, scores: Scores | None, num_shards: int):
    """(chunk key, (id, record bytes | Skip | Filtered)) of one reader item."""
    outcome = item if isinstance(item, Skip) else to_record(item, checks, scores)
    return zlib.crc32(item.id.encode("utf-8")) % num_shards, (item.id, outcome)


def _write(keyed, out: str, base: int) -> int:
    """Commits one chunk (returns its index): its records sorted by id, duplicates of an id reported as skips."""
    key, items = keyed
    records, skipped, filtered, seen = [], [], [], set()
    for rid, outcome in sorted(items, key=lambda x: (x[0], type(x[1]).__name__)):
        if rid in seen:
            outcome = Skip(rid, DUPLICATE_ID)
        seen.add(rid)
        if isinstance(outcome, (Skip, Filtered)):
            (skipped if isinstance(outcome, Skip) else filtered).append(outcome)
            local_build.log_outcome(outcome)
        else:
            records.append((rid, outcome))
    return commit_chunk(out, base + key, records, skipped, filtered)["chunk"]


def build(reader, out: str, opts: dict, *, checks: Checks = Checks(), scores: Scores | None = None,
          num_shards: int = 16, pipeline_args: list[str] | None = None) -> dict:
    """Builds (or finishes) DIR `out` with Beam; returns {"run": counts of this run, "dataset": dataset.json}."""
    beam, PipelineOptions = _beam()
    state = BuildDir(out, opts)
    done, base = frozenset(state.done_ids), state.next_chunk
    args = list(pipeline_args or [])
    if not any(a.startswith("--runner") for a in args):
        args.append("--runner=DirectRunner")
    with beam.Pipeline(options=PipelineOptions(args)) as p:
        _ = (p
             | "units" >> beam.Create(reader.units())
             | "spread units" >> beam.Reshuffle()
             | "read" >> beam.FlatMap(reader.read)
             | "not done" >> beam.Filter(lambda item: item.id not in done)
             | "to records" >> beam.Map(_outcome, checks, scores, num_shards)
             | "by chunk" >> beam.GroupByKey()
             | "write chunks" >> beam.Map(_write, out, base))
    new_chunks = set(range(base, base + num_shards))
    state.reload()
    ran = [m for m in state.manifests if m["chunk"] in new_chunks]
    skipped = [s for m in ran for s in m["skipped"]]
    filtered = [f for m in ran for f in m["filtered"]]
    run = {"written": sum(len(m["ids"]) for m in ran), "already_done": len(done),
           "skipped": dict(collections.Counter(s["reason"] for s in skipped)),
           "filtered": dict(collections.Counter(f["reason"] for f in filtered))}
    return {"run": run, "dataset": state.finalize()}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m data_pipelines.beam", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    local_build.add_arguments(parser)
    parser.add_argument("--num-shards", type=int, default=16, help="chunks (shards) written by this run")
    args, pipeline_args = parser.parse_known_args(argv)
    local_build.validate(parser, args)
    if args.num is not None and args.format != "toy":
        parser.error("--num is supported by the Beam build for --format toy only")
    if args.num_shards < 1:
        parser.error("--num-shards must be >= 1")
    log.setLevel(logging.INFO)
    try:
        storage.check_reachable(args.out)
        reader = local_build.make_reader(args)
        scores = Scores(args.filter_scores, args.min_score) if args.filter_scores else None
        result = build(reader, args.out, local_build.options(args), checks=Checks(args.min_side, args.max_aspect),
                       scores=scores, num_shards=args.num_shards, pipeline_args=pipeline_args)
    except (FileNotFoundError, ValueError, ImportError, storage.StorageError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(local_build.report(result))
    return 0


if __name__ == "__main__":
    local_build.cli_logging()
    sys.exit(main())
