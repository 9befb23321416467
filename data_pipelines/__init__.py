"""Offline dataset builders: raw edit datasets -> ArrayRecord shards of msgpack edit-pair records.

Modules: `records` (the record schema, resumable sharded writing, reading), one reader per raw layout
(`seed_edit`, `imgedit`, `webdataset`) plus the procedural `toy` dataset, the `build` and `describe` CLIs and the
Apache Beam pipeline `beam`. A reader has `units() -> list[str]` (annotation files, shards, index blocks) and
`read(unit) -> Iterator[RawPair | Skip]`, and pickles (Beam ships it to workers).
Imports nothing from `varedit_jax`.
"""
