"""A hang watchdog for long runs: a step that takes far longer than usual is a hang (a stuck collective, a dead
peer host, a stalled read), and a run that hangs holds its slice doing nothing until someone notices.

`Watchdog(config.watchdog)` runs a daemon thread on every process. The loop brackets each step with `begin(step)` /
`end(step)`. After `warmup_steps` finished steps, a step running longer than `factor` x the median step time (and at
least `min_s` seconds) is reported: every thread's stack (faulthandler) and the last finished step, on stderr of
every process (each one's own watchdog fires, since a collective hang stalls them all). If the step has still not
finished `grace_s` seconds later, the process exits with `HANG_EXIT_CODE` so a launcher restarts the run, which
resumes from its newest checkpoint. `factor <= 0` turns it off.
"""
import faulthandler
import os
import statistics
import sys
import threading
import time

import ml_collections

HANG_EXIT_CODE = 75  # EX_TEMPFAIL: try again


def default_config() -> ml_collections.ConfigDict:
    """`config.watchdog` (steps are numbered from 1, as in metrics.jsonl)."""
    return ml_collections.ConfigDict(dict(factor=10.0, warmup_steps=5, min_s=60.0, grace_s=120.0))


def exit_process(code: int) -> None:
    """How the watchdog ends a hung process (no cleanup can run: the main thread is stuck)."""
    sys.stderr.flush()
    os._exit(code)


class Watchdog:
    """See the module docstring. Use as a context manager around the loop."""

    def __init__(self, config: ml_collections.ConfigDict, *, poll_s: float = 1.0):
        self.config, self.poll_s = config, poll_s
        self.durations: list[float] = []
        self.current: tuple[int, float] | None = None  # (step, start time) of the step in flight
        self.last_finished: int | None = None
        self._stop = threading.Event()
        self._thread = None

    def __enter__(self):
        if self.config.factor > 0:
            self._thread = threading.Thread(target=self._watch, daemon=True, name="hang-watchdog")
            self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def begin(self, step: int) -> None:
        self.current = (step, time.monotonic())

    def end(self, step: int) -> None:
        if self.current is not None and self.current[0] == step:
            self.durations.append(time.monotonic() - self.current[1])
        self.current, self.last_finished = None, step

    def limit_s(self) -> float | None:
        """How long a step may run before it counts as hung (None during warm-up)."""
        if len(self.durations) < self.config.warmup_steps:
            return None
        return max(self.config.factor * statistics.median(self.durations[-100:]), self.config.min_s)

    def _watch(self) -> None:
        while not self._stop.wait(self.poll_s):
            current, limit = self.current, self.limit_s()
            if current is None or limit is None or time.monotonic() - current[1] <= limit:
                continue
            step, started = current
            print(f"watchdog: step {step} has run {time.monotonic() - started:.0f} s (limit {limit:.0f} s = "
                  f"{self.config.factor:g} x the median step); last finished step {self.last_finished}; stacks of "
                  f"every thread follow; exiting with code {HANG_EXIT_CODE} in {self.config.grace_s:.0f} s unless it "
                  f"finishes", file=sys.stderr, flush=True)
            faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
            if self._stop.wait(self.config.grace_s):
                return
            if self.current is current:
                print(f"watchdog: step {step} is still running: exiting (re-run the same command to resume "
                      f"from the newest checkpoint)", file=sys.stderr, flush=True)
                exit_process(HANG_EXIT_CODE)
