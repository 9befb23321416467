"""Multi-process runs: joining `jax.distributed`, and preemption.

`init_distributed` joins a run of several processes (TPU pods: every host runs the same command); the toy assets a
config needs are built before, in a single-process child. `Preemption` tells the training loop after every step
whether to save a checkpoint and return:
  - one process: SIGTERM / SIGINT set a flag (our handler, for the loop's duration);
  - under jax.distributed: JAX's preemption service, which owns SIGTERM: `reached(step)` turns true on every
    process at the same step (`multihost_utils.reached_preemption_sync_point`) whichever host was signalled, so
    all of them save that step together (orbax's save is collective) and exit 0.
"""
import signal

import jax
import ml_collections
from jax.experimental import multihost_utils

from varedit_jax import assets


def init_distributed(configs: list[ml_collections.ConfigDict], auto: bool = False, coordinator: str | None = None,
                     num_processes: int | None = None, process_id: int | None = None) -> None:
    """Joins a multi-process run: `auto` (TPU pods, clusters: jax.distributed finds its peers) or an explicit
    `coordinator` HOST:PORT with `num_processes` / `process_id`; nothing otherwise. The toy assets the configs (of
    the run, or of every stage of a recipe) need are built first, in a single-process child
    (`assets.build_in_child`)."""
    if not (auto or coordinator):
        return
    if coordinator and (num_processes is None or process_id is None):
        raise ValueError("--coordinator needs --num_processes and --process_id")
    for config in configs:
        assets.build_in_child(config)
    if coordinator:
        jax.distributed.initialize(coordinator, num_processes, process_id)
    else:
        jax.distributed.initialize()


class Preemption:
    """`with Preemption() as p:` ... `if p.reached(step): save and return` (see the module docstring). Every
    process must call `reached` after every step, from the same step on."""

    def __init__(self):
        self.requested = False
        self._previous = {}
        self.collective = jax.process_count() > 1

    def __enter__(self):
        if self.collective:  # JAX's preemption service handles SIGTERM; do not override it
            return self
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

    def reached(self, step: int) -> bool:
        """Whether to save after `step` and stop (the same answer on every process)."""
        if self.collective:
            self.requested = self.requested or multihost_utils.reached_preemption_sync_point(step)
        return self.requested

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
