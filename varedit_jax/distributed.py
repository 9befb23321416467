"""Multi-process runs: joining `jax.distributed`, and preemption.

`init_distributed` joins a run of several processes (TPU pods: every host runs the same command); the toy assets a
config needs are built before, in a single-process child. `Preemption` turns SIGTERM / SIGINT into a flag the
training loop checks after every step (it then saves a checkpoint and returns).
"""
import signal

import jax
import ml_collections

from varedit_jax import assets


def init_distributed(config: ml_collections.ConfigDict, auto: bool = False, coordinator: str | None = None,
                     num_processes: int | None = None, process_id: int | None = None) -> None:
    """Joins a multi-process run: `auto` (TPU pods, clusters: jax.distributed finds its peers) or an explicit
    `coordinator` HOST:PORT with `num_processes` / `process_id`; nothing otherwise. The toy assets the config needs are
    built first, in a single-process child (`assets.build_in_child`)."""
    if not (auto or coordinator):
        return
    if coordinator and (num_processes is None or process_id is None):
        raise ValueError("--coordinator needs --num_processes and --process_id")
    assets.build_in_child(config)
    if coordinator:
        jax.distributed.initialize(coordinator, num_processes, process_id)
    else:
        jax.distributed.initialize()


class Preemption:
    """SIGTERM / SIGINT set a flag; the loop saves and returns after the current step."""

    def __init__(self):
        self.requested = False
        self._previous = {}

    def __enter__(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: no handler
                pass
        return self

    def _handle(self, signum, frame):
        del frame
        self.requested = True
        print(f"signal {signum}: saving a checkpoint after this step", flush=True)

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
