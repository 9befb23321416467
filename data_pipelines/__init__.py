"""Offline dataset builders: raw edit datasets -> ArrayRecord shards of msgpack edit-pair records.

Modules: `records` (the record schema, resumable sharded writing, reading; `Pairs` over record and TFDS datasets),
one reader per raw layout (`seed_edit`, `imgedit`, `webdataset`, `pairs` for your own JSONL / parquet pairs) plus the
procedural `toy` dataset, the `build` and `describe` CLIs, the Apache Beam pipeline `beam`, the editing benchmarks'
loaders (`benchmarks`) and the TFDS builders (`tfds_builders`, CLI `tfds_build`). A reader has
`units() -> list[str]` (annotation files, shards, index blocks) and `read(unit) -> Iterator[RawPair | Skip]`, and
pickles (Beam ships it to workers).
Imports nothing of the `varedit_jax` model: only `varedit_jax.storage` (local and gs:// paths, one path type).
"""
