"""Where files live: every path the project reads or writes is local or `gs://bucket/...`, through one path type.

`path(p)` gives an `etils.epath.Path` (what orbax and grain use): local paths expanded and absolute, `gs://` paths
as they are (reads and writes go through gcsfs; orbax's arrays through TensorStore; ArrayRecord shards through
array_record's own GCS client). What differs on GCS, and how this module hides it:
  - objects are written whole and cannot be appended to: `Mirror` keeps append-only files (metrics.jsonl,
    TensorBoard events) in a local directory and uploads the changed ones on `push()` (the trainer pushes at every
    checkpoint, every `push_every_s` seconds and at exit, so a kill loses only rows after the newest checkpoint,
    which a resumed run logs again);
  - libraries that need a local file (PIL, safetensors, torch, ArrayRecordWriter) get one from `local_copy` (reads:
    a downloaded temporary copy) or `staged` (writes: uploaded when the block ends);
  - an unreachable endpoint or a missing bucket is one line (`check_reachable`, StorageError) within seconds,
    never minutes of retries;
  - gcsfs caches directory listings (object sizes included) for the life of a process, so a long-lived reader
    would see another process's newer object cut to its old size: the listings cache is turned off for gs://
    when this module is imported (before any gs:// filesystem is made).
Endpoints: real GCS by default (application default credentials); a GCS emulator when `STORAGE_EMULATOR_HOST` and
the other variables of `emulator_environment` are set (the tests do, for every process they start).
"""
import contextlib
import hashlib
import os
import pathlib
import re
import shutil
import tempfile
from typing import Iterator

import fsspec
from etils import epath

fsspec.config.conf.setdefault("gs", {})["use_listings_cache"] = False

Path = epath.Path
REMOTE_PREFIX = "gs://"


class StorageError(OSError):
    """A storage location that cannot be used (unreachable endpoint, missing bucket, unsupported scheme)."""


def is_remote(p) -> bool:
    return os.fspath(p).startswith(REMOTE_PREFIX)


def path(p) -> epath.Path:
    """`p` (str / os.PathLike) as an epath.Path: gs:// as given, local expanded and absolute."""
    s = os.fspath(p)
    if is_remote(s):
        return epath.Path(s)
    if "://" in s:
        raise StorageError(f"{s}: only local paths and gs:// are supported")
    return epath.Path(pathlib.Path(s).expanduser().resolve())


def bucket_of(p) -> str:
    return os.fspath(p)[len(REMOTE_PREFIX):].split("/", 1)[0]


def _reason(e: BaseException) -> str:
    """The root cause of a storage client error in a few words."""
    e = getattr(e, "cause", None) or e
    text = str(e)
    found = re.search(r"\[Errno -?\d+\] [^'\")\]]+", text)
    first = text.strip().splitlines()[0][:160] if text.strip() else ""
    return found.group(0) if found else f"{type(e).__name__}: {first}"


def check_reachable(p, timeout_s: float = 8.0) -> None:
    """Raises StorageError (one line) unless the bucket of a gs:// path answers within about `timeout_s` seconds;
    nothing for local paths."""
    if not is_remote(p):
        return
    from google.api_core import retry
    from google.cloud import storage as gcs
    bucket = bucket_of(p)
    endpoint = os.environ.get("STORAGE_EMULATOR_HOST", "https://storage.googleapis.com")
    try:
        client = gcs.Client(project=os.environ.get("GOOGLE_CLOUD_PROJECT"))
        found = client.lookup_bucket(bucket, timeout=(min(4.0, timeout_s), timeout_s),
                                     retry=retry.Retry(timeout=timeout_s, initial=0.5, maximum=2.0))
    except Exception as e:  # noqa: BLE001 - google-api-core, requests and google-auth raise their own types
        raise StorageError(f"cannot reach gs://{bucket} at {endpoint}: {_reason(e)}") from None
    if found is None:
        raise StorageError(f"bucket gs://{bucket} does not exist (at {endpoint})")


def write_bytes(p, data: bytes) -> None:
    """Writes a whole file: atomically (temporary file + rename) locally; one object upload on GCS."""
    p = path(p)
    if is_remote(p):
        p.write_bytes(data)
        return
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(f".{p.name}.tmp{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, p)


def write_text(p, text: str) -> None:
    write_bytes(p, text.encode("utf-8"))


def makedirs(p) -> epath.Path:
    """`p` as a directory (created locally; on GCS a prefix exists once an object is under it)."""
    p = path(p)
    if not is_remote(p):
        p.mkdir(parents=True, exist_ok=True)
    return p


def remove_tree(p) -> None:
    p = path(p)
    if p.exists():
        p.rmtree() if p.is_dir() else p.unlink()


def find_files(root, suffix: str) -> list[epath.Path]:
    """Every file under `root` (any depth) whose name ends with `suffix`, sorted (epath refuses `**` on gs://)."""
    found, todo = [], [path(root)]
    while todo:
        for child in todo.pop().iterdir():
            if child.is_dir():
                todo.append(child)
            elif child.name.endswith(suffix):
                found.append(child)
    return sorted(found, key=os.fspath)


def _scratch(what: str) -> pathlib.Path:
    d = pathlib.Path(tempfile.gettempdir()) / "varedit_storage" / what
    d.mkdir(parents=True, exist_ok=True)
    return d


@contextlib.contextmanager
def local_copy(p) -> Iterator[pathlib.Path]:
    """A local path holding the file or folder (its files, not sub-folders) `p`: `p` itself when local, else a
    temporary download removed afterwards."""
    p = path(p)
    if not is_remote(p):
        yield pathlib.Path(p)
        return
    with tempfile.TemporaryDirectory(dir=_scratch("downloads")) as d:
        local = pathlib.Path(d) / p.name
        if p.is_dir():
            local.mkdir()
            for f in p.iterdir():
                if f.is_file():
                    f.copy(epath.Path(local / f.name))
        else:
            p.copy(epath.Path(local))
        yield local


@contextlib.contextmanager
def staged(p) -> Iterator[pathlib.Path]:
    """A local path to write the file `p` to: `p` itself when local (parents created), else a temporary file
    uploaded when the block ends without an exception."""
    p = path(p)
    if not is_remote(p):
        pathlib.Path(p).parent.mkdir(parents=True, exist_ok=True)
        yield pathlib.Path(p)
        return
    with tempfile.TemporaryDirectory(dir=_scratch("uploads")) as d:
        local = pathlib.Path(d) / p.name
        yield local
        epath.Path(local).copy(p, overwrite=True)


class Mirror:
    """A directory whose files are written locally and published to `remote` (append-only files on GCS).

    For a local `remote`, `local` is that directory and `push` does nothing. For gs://, `local` is a scratch
    directory keyed by the remote path; `pull(name)` fetches an existing file first (a resumed run appends to it),
    `push()` uploads every file changed since the last push (whole objects: GCS cannot append)."""

    def __init__(self, remote):
        self.remote = path(remote)
        if not is_remote(self.remote):
            self.local = pathlib.Path(makedirs(self.remote))
            return
        key = hashlib.sha1(os.fspath(self.remote).encode()).hexdigest()[:16]
        self.local = _scratch("mirrors") / key
        shutil.rmtree(self.local, ignore_errors=True)
        self.local.mkdir(parents=True)
        self._pushed: dict[str, tuple[int, int]] = {}

    def pull(self, name: str) -> None:
        if is_remote(self.remote) and (self.remote / name).exists():
            (self.local / name).parent.mkdir(parents=True, exist_ok=True)
            (self.remote / name).copy(epath.Path(self.local / name), overwrite=True)
            self._pushed[name] = self._signature(self.local / name)

    @staticmethod
    def _signature(f: pathlib.Path) -> tuple[int, int]:
        st = f.stat()
        return st.st_size, st.st_mtime_ns

    def push(self) -> int:
        """Uploads the files changed since the last push; returns how many."""
        if not is_remote(self.remote):
            return 0
        n = 0
        for f in sorted(self.local.rglob("*")):
            if not f.is_file():
                continue
            name, sig = f.relative_to(self.local).as_posix(), self._signature(f)
            if self._pushed.get(name) != sig:
                epath.Path(f).copy(self.remote / name, overwrite=True)
                self._pushed[name] = sig
                n += 1
        return n


def emulator_environment(url: str) -> dict[str, str]:
    """Every variable the storage libraries read for their endpoint, aimed at a GCS emulator at `url`
    (http://127.0.0.1:PORT), with credential and metadata-server probes kept on loopback (see
    ../shared/reference/cloud_storage_verified.md): google-cloud-storage and gcsfs, TensorStore (orbax's arrays),
    google-cloud-cpp (array_record's native gs:// reads)."""
    return {
        "STORAGE_EMULATOR_HOST": url, "TENSORSTORE_GCS_HTTP_URL": url, "CLOUD_STORAGE_EMULATOR_ENDPOINT": url,
        "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false", "FSSPEC_GCS_TOKEN": "anon", "FSSPEC_GS_TOKEN": "anon",
        "GOOGLE_AUTH_TOKEN_FOR_TESTING": "fake", "GOOGLE_CLOUD_PROJECT": "test", "NO_GCE_CHECK": "true",
        "GCE_METADATA_HOST": "127.0.0.1:1", "GCE_METADATA_IP": "127.0.0.1:1", "GCE_METADATA_ROOT": "127.0.0.1:1",
    }
