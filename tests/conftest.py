"""Shared pytest setup: 8 simulated CPU devices, one asset cache and one XLA compilation cache per session, the
session's tiny trained run, markers and `--quick`.

Markers (declared in pytest.ini):
  slow    long tests; `--quick` deselects them, and composes with `-m parity` etc.
  parity  numerical parity with fixtures produced by the official PyTorch code.

The session directory (removed at the end) holds `assets/` (`VAREDIT_CACHE`: the toy dataset, tokenizer and text
encoder of `helpers.SMALL`, built once for every test and subprocess), `xla/` (JAX's persistent compilation
cache: a program compiled by one test or subprocess is loaded, not recompiled, by the next) and `gcs/` (the GCS
emulator's storage). Every storage endpoint variable of this process and of the processes tests start points at
the session's GCS emulator on 127.0.0.1 (`gcs_emulator.reserve`), started by the `gcs` fixture on first use: no
test reaches any other address. Fixture discovery helpers for parity tests live in tests/helpers.py.
"""
import os
import shutil
import tempfile

_SESSION = tempfile.mkdtemp(prefix="varedit_tests_")
# Every test process sees 8 CPU devices, so sharding tests run in-process (must precede the first jax import), and
# XLA:CPU compiles without LLVM's optimisation passes: the suite's programs are small and compiled once or twice each,
# so compile time dominates (about a third less wall time; results are the same programs, checked by the same tests).
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0")
# The suite runs on CPU (libtpu from the tpu extra is only used for AOT compiles against TPU topologies).
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("VAREDIT_CACHE", os.path.join(_SESSION, "assets"))
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(_SESSION, "xla"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")

import pytest  # noqa: E402

import gcs_emulator  # noqa: E402
from helpers import small_config, torchvision_without_cuda_ops  # noqa: E402

torchvision_without_cuda_ops()  # before anything imports torchvision (lpips, transformers): see its docstring

_EMULATOR = gcs_emulator.reserve(os.path.join(_SESSION, "gcs"))


def pytest_addoption(parser):
    parser.addoption("--quick", action="store_true", help="deselect tests marked slow")


def pytest_collection_modifyitems(config, items):
    if not config.getoption("--quick"):
        return
    kept, dropped = [], []
    for item in items:
        (dropped if item.get_closest_marker("slow") else kept).append(item)
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = kept


def pytest_sessionfinish(session, exitstatus):
    _EMULATOR.stop()
    shutil.rmtree(_SESSION, ignore_errors=True)


@pytest.fixture(scope="session")
def gcs():
    """The session's GCS emulator, started on first use, with its bucket: yields "gs://varedit-test"."""
    if _EMULATOR.proc is None:
        _EMULATOR.start()
    return _EMULATOR.make_bucket("varedit-test")


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory):
    """The session's tiny trained run: `helpers.small_config()` trained for 4 steps (checkpoints at 2 and 4), its
    end-of-run toy scores on 4 held-out pairs, in a workdir tests may read but not change; returns
    (workdir, summary)."""
    from varedit_jax import train
    workdir = tmp_path_factory.mktemp("trained_run")
    summary = train.train(small_config(total_steps=4, checkpoint_every=2, toy_eval_pairs=4), workdir)
    return workdir, summary
