"""Shared pytest setup: 8 simulated CPU devices, markers and `--quick`.

Markers (declared in pytest.ini):
  slow    long tests; `--quick` deselects them, and composes with `-m parity` etc.
  parity  numerical parity with fixtures produced by the official PyTorch code.

Fixture discovery helpers for parity tests live in tests/helpers.py.
"""
import os

# Every test process sees 8 CPU devices, so sharding tests run in-process (must precede the first jax import).
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
# The suite runs on CPU (libtpu from the tpu extra is only used for AOT compiles against TPU topologies).
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pytest  # noqa: E402


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
