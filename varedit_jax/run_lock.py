"""A training workdir belongs to one run at a time: `WORKDIR/run.lock`.

The lock is a JSON file {"host", "pid", "boot_id", "started", "refreshed"} created exclusively (O_EXCL: of two
runs starting together exactly one wins) by process 0 and refreshed every `REFRESH_S` seconds by a daemon thread.
A second run on the workdir is refused with a message naming the holder, unless the lock is stale:
  - its pid is dead on this host (same host name and boot id): stale at once, so a run killed with -9 resumes
    without waiting;
  - otherwise no refresh for `STALE_S` seconds (a holder on another host, or one frozen).
A stale lock is taken over (recorded in the new lock's "replaced"); the lock is removed when the run ends.
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


class RunLock:
    """`with RunLock(workdir):` holds WORKDIR/run.lock for the block (see the module docstring)."""

    def __init__(self, workdir: pathlib.Path):
        self.path = pathlib.Path(workdir) / LOCK_NAME
        self.me = {"host": socket.gethostname(), "pid": os.getpid(), "boot_id": _boot_id(), "started": time.time()}
        self._stop = threading.Event()
        self._thread = None

    def _create(self, extra: dict) -> bool:
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as f:
            json.dump({**self.me, "refreshed": time.time(), **extra}, f)
        return True

    def _read(self) -> dict | None:
        try:
            return json.loads(self.path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError):  # half-written or damaged: treat as a lock that nobody refreshes
            return {"host": "?", "pid": -1, "refreshed": self.path.stat().st_mtime}

    def acquire(self) -> None:
        """Takes the lock or raises WorkdirLocked naming the live holder."""
        for _ in range(3):
            if self._create({}):
                break
            holder = self._read()
            if holder is None:
                continue
            if not _stale(holder, time.time()):
                raise WorkdirLocked(f"{self.path.parent} is in use by another run ({describe(holder)}); wait for it "
                                    f"to end, or remove {self.path} if that run is gone")
            stale = self.path.with_name(f"{LOCK_NAME}.stale.{os.getpid()}")
            try:
                os.replace(self.path, stale)  # atomic: of two takers only one moves this lock
            except FileNotFoundError:
                continue
            os.unlink(stale)
            if self._create({"replaced": holder}):
                break
        else:
            raise WorkdirLocked(f"could not take {self.path}: it keeps changing (another run is starting)")
        self._thread = threading.Thread(target=self._refresh, daemon=True, name="run-lock")
        self._thread.start()

    def _refresh(self) -> None:
        while not self._stop.wait(REFRESH_S):
            holder = self._read()
            if not holder or holder.get("pid") != self.me["pid"] or holder.get("host") != self.me["host"]:
                return  # taken over (we were judged stale): never overwrite the new holder's lock
            tmp = self.path.with_name(f"{LOCK_NAME}.{os.getpid()}.tmp")
            tmp.write_text(json.dumps({**holder, "refreshed": time.time()}))
            os.replace(tmp, self.path)

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        holder = self._read()
        if holder and holder.get("pid") == self.me["pid"] and holder.get("host") == self.me["host"]:
            self.path.unlink(missing_ok=True)

    def __enter__(self):
        self.acquire()
        return self

    def __exit__(self, *exc):
        self.release()


@contextlib.contextmanager
def hold(workdir: pathlib.Path):
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
