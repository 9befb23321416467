"""WebDataset tar shards in the layout of the official VAREdit trainer (`infinity/dataset/webdataset.py`).

Each sample is a group of consecutive tar members sharing a key (the member path up to the first dot of its file
name): `<key>.src.jpg` (source image), `<key>.tgt.jpg` (target image), `<key>.txt` (UTF-8 instruction). Other image
extensions (`src.png`, ...) are accepted. `src` is a `.tar` file or a folder searched recursively for `*.tar`
(also `.tar.gz`/`.tgz`); shards are read sequentially (no index needed).
Ids: "webdataset:<tar path relative to src>:<key>". A damaged tar ends its shard with a counted skip.
"""
import glob
import io
import os
import tarfile
from typing import Iterator

from data_pipelines.records import BAD_ANNOTATION, DAMAGED_ARCHIVE, MISSING_IMAGE, RawPair, Skip

FORMAT = "webdataset"
_SHARD_PATTERNS = ("*.tar", "*.tar.gz", "*.tgz")


def split_member(name: str) -> tuple[str, str]:
    """(key, extension) of a member path, WebDataset style: 'a/b.src.jpg' -> ('a/b', 'src.jpg')."""
    folder, base = os.path.split(name)
    stem, _, ext = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), ext


def iter_samples(path: str) -> Iterator[tuple[str, dict[str, bytes]]]:
    """(key, {extension: bytes}) for each sample of a tar shard, in storage order; raises tarfile.TarError."""
    key, sample = None, {}
    with tarfile.open(path, "r|*") as tar:
        for member in tar:
            if not member.isfile():
                continue
            k, ext = split_member(member.name)
            if k != key:
                if key is not None:
                    yield key, sample
                key, sample = k, {}
            sample[ext] = tar.extractfile(member).read()
    if key is not None:
        yield key, sample


def write_shard(path: str, samples: list[tuple[str, dict[str, bytes]]]) -> None:
    """Writes samples [(key, {extension: bytes})] as an (uncompressed) tar shard, members in the given order."""
    with tarfile.open(path, "w") as tar:
        for key, members in samples:
            for ext, data in members.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def _member(sample: dict[str, bytes], prefix: str) -> bytes | None:
    if f"{prefix}.jpg" in sample:
        return sample[f"{prefix}.jpg"]
    return next((v for ext, v in sorted(sample.items()) if ext.startswith(f"{prefix}.")), None)


class Reader:
    """Pairs of WebDataset shards; a unit is one shard."""

    def __init__(self, src: str):
        if not os.path.exists(src):
            raise FileNotFoundError(f"WebDataset source {src} does not exist")
        self.src = src

    def units(self) -> list[str]:
        if os.path.isfile(self.src):
            return [os.path.basename(self.src)]
        files = sorted({f for p in _SHARD_PATTERNS for f in glob.glob(os.path.join(self.src, "**", p), recursive=True)})
        if not files:
            raise FileNotFoundError(f"no tar shards below {self.src}")
        return [os.path.relpath(f, self.src) for f in files]

    def read(self, unit: str) -> Iterator[RawPair | Skip]:
        path = self.src if os.path.isfile(self.src) else os.path.join(self.src, unit)
        try:
            for key, sample in iter_samples(path):
                rid = f"{FORMAT}:{unit}:{key}"
                src, tgt = _member(sample, "src"), _member(sample, "tgt")
                if src is None or tgt is None:
                    yield Skip(rid, MISSING_IMAGE, f"members {sorted(sample)}")
                    continue
                try:
                    text = sample.get("txt", b"").decode("utf-8")
                except UnicodeDecodeError as e:
                    yield Skip(rid, BAD_ANNOTATION, f"txt is not UTF-8: {e}")
                    continue
                yield RawPair(rid, text, src, tgt)
        except (tarfile.TarError, OSError, EOFError) as e:
            yield Skip(f"{FORMAT}:{unit}", DAMAGED_ARCHIVE, f"rest of the shard skipped: {e}")
