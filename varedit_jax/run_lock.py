"""A training workdir belongs to one run at a time: `WORKDIR/run.lock`.

The lock is a JSON object {"host", "pid", "boot_id", "started", "refreshed"} created exclusively by process 0 (of
two runs starting together exactly one wins: O_EXCL locally, `if_generation_match=0` on gs://) and refreshed every
`REFRESH_S` seconds by a daemon thread. A second run on the workdir is refused with a message naming the holder,
unless the lock is stale:
  - its pid is dead on this host (same host name and boot id): stale at once, so a run killed with -9 resumes
    without waiting;
  - otherwise no refresh for `STALE_S` seconds (a holder on another host, or one frozen).
A stale lock is taken over (recorded in the new lock's "replaced"; on gs:// only if its generation is unchanged);
the lock is removed when the run ends.
"""
import contextlib
import json
import os
import pathlib
import socket
import threading
import time

import jax
import numpy as np
from jax.experimental import multihost_utils

from varedit_jax import storage

LOCK_NAME = "run.lock"
REFRESH_S = 30.0
STALE_S = 120.0


class WorkdirLocked(RuntimeError):
    """Another live run holds the workdir."""


def _boot_id() -> str:
    try:
        return pathlib.Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _stale(holder: dict, now: float) -> bool:
    same_machine = holder.get("host") == socket.gethostname() and holder.get("boot_id") == _boot_id()
    if same_machine and not _pid_alive(int(holder.get("pid", -1))):
        return True
    return now - float(holder.get("refreshed", 0.0)) > STALE_S


def describe(holder: dict) -> str:
    age = time.time() - float(holder.get("refreshed", 0.0))
    return (f"pid {holder.get('pid')} on {holder.get('host')}, started "
            f"{time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(float(holder.get('started', 0.0))))}, "
            f"last refreshed {age:.0f} s ago")


def _parse(data: bytes, fallback_time: float) -> dict:
    try:
        return json.loads(data)
    except ValueError:  # half-written or damaged: a lock that nobody refreshes
        return {"host": "?", "pid": -1, "refreshed": fallback_time}


class _LocalFile:
    """The lock as a local file. Versions are (inode, mtime) pairs."""

    def __init__(self, path):
        self.path = pathlib.Path(path)

    def create(self, data: bytes) -> bool:
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        return True

    def read(self) -> tuple[dict, object] | None:
        try:
            st, data = self.path.stat(), self.path.read_bytes()
        except FileNotFoundError:
            return None
        return _parse(data, st.st_mtime), (st.st_ino, st.st_mtime_ns)

    def remove(self, version) -> bool:
        """Removes the lock if it is still at `version` (atomic: of two removers only one moves it away)."""
        read = self.read()
        if read is None or read[1] != version:
            return False
        stale = self.path.with_name(f"{LOCK_NAME}.stale.{os.getpid()}")
        try:
            os.replace(self.path, stale)
        except FileNotFoundError:
            return False
        os.unlink(stale)
        return True

    def replace(self, data: bytes, version) -> bool:
        del version  # only the holder writes (it checked it still holds the lock)
        tmp = self.path.with_name(f"{LOCK_NAME}.{os.getpid()}.tmp")
        tmp.write_bytes(data)
        os.replace(tmp, self.path)
        return True


class _GcsObject:
    """The lock as a GCS object; versions are object generations (conditional requests)."""

    def __init__(self, path):
        from google.cloud import storage as gcs
        self.blob = gcs.Client().bucket(storage.bucket_of(path)).blob(os.fspath(path).split("/", 3)[3])

    def _guarded(self, fn) -> bool:
        from google.api_core import exceptions
        try:
            fn()
            return True
        except (exceptions.PreconditionFailed, exceptions.NotFound):
            return False

    def create(self, data: bytes) -> bool:
        return self._guarded(lambda: self.blob.upload_from_string(data, if_generation_match=0))

    def read(self) -> tuple[dict, object] | None:
        from google.api_core import exceptions
        try:
            data = self.blob.download_as_bytes()
        except exceptions.NotFound:
            return None
        return _parse(data, time.time() - STALE_S - 1), self.blob.generation

    def remove(self, version) -> bool:
        return self._guarded(lambda: self.blob.delete(if_generation_match=version))

    def replace(self, data: bytes, version) -> bool:
        return self._guarded(lambda: self.blob.upload_from_string(data, if_generation_match=version))


class RunLock:
    """`with RunLock(workdir):` holds WORKDIR/run.lock for the block (see the module docstring)."""

    def __init__(self, workdir):
        self.path = storage.path(workdir) / LOCK_NAME
        self.file = _GcsObject(self.path) if storage.is_remote(self.path) else _LocalFile(self.path)
        self.me = {"host": socket.gethostname(), "pid": os.getpid(), "boot_id": _boot_id(), "started": time.time()}
        self._stop = threading.Event()
        self._thread = None

    def _mine(self, holder: dict | None) -> bool:
        return bool(holder) and holder.get("pid") == self.me["pid"] and holder.get("host") == self.me["host"]

    def _record(self, **extra) -> bytes:
        return json.dumps({**self.me, "refreshed": time.time(), **extra}).encode()

    def acquire(self) -> None:
        """Takes the lock or raises WorkdirLocked naming the live holder."""
        for _ in range(3):
            if self.file.create(self._record()):
                break
            read = self.file.read()
            if read is None:
                continue
            holder, version = read
            if not _stale(holder, time.time()):
                raise WorkdirLocked(f"{self.path.parent} is in use by another run ({describe(holder)}); wait for it "
                                    f"to end, or remove {self.path} if that run is gone")
            if self.file.remove(version) and self.file.create(self._record(replaced=holder)):
                break
        else:
            raise WorkdirLocked(f"could not take {self.path}: it keeps changing (another run is starting)")
        self._thread = threading.Thread(target=self._refresh, daemon=True, name="run-lock")
        self._thread.start()

    def _refresh(self) -> None:
        while not self._stop.wait(REFRESH_S):
            read = self.file.read()
            if read is None or not self._mine(read[0]):
                return  # taken over (we were judged stale): never overwrite the new holder's lock
            if not self.file.replace(json.dumps({**read[0], "refreshed": time.time()}).encode(), read[1]):
                return

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        read = self.file.read()
        if read is not None and self._mine(read[0]):
            self.file.remove(read[1])

    def __enter__(self):
        self.acquire()
        return self

    def __exit__(self, *exc):
        self.release()


@contextlib.contextmanager
def hold(workdir):
    """The run's lock for the block: process 0 takes it; under jax.distributed every process learns the outcome,
    so all of them refuse together (WorkdirLocked) rather than some waiting in a collective."""
    lock, error = None, ""
    if jax.process_index() == 0:
        try:
            lock = RunLock(workdir)
            lock.acquire()
        except WorkdirLocked as e:
            lock, error = None, str(e)
    if jax.process_count() > 1:
        refused = multihost_utils.broadcast_one_to_all(np.int32(bool(error)))
        if refused and not error:
            error = f"{workdir} is in use by another run (see process 0's message)"
    if error:
        raise WorkdirLocked(error)
    try:
        yield lock
    finally:
        if lock is not None:
            lock.release()
