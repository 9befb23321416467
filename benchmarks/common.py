"""What every benchmark records about the machine, and how it writes its JSON."""
import json
import os
import pathlib
import platform
import statistics
import time

import jax


def machine() -> dict:
    """Platform, CPU count, JAX version and backend (absolute times only compare on the same machine)."""
    return {"platform": platform.platform(), "cpu": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(), "python": platform.python_version(), "jax": jax.__version__,
            "backend": jax.default_backend(), "device": str(jax.devices()[0])}


def write(result: dict, out: str | os.PathLike) -> pathlib.Path:
    """Writes `result` with the machine description as indented JSON to `out` (parents created)."""
    out = pathlib.Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"machine": machine(), **result}, indent=1) + "\n")
    print(f"wrote {out}")
    return out


def median_seconds(call, *, repeats: int, warmup: int = 1) -> dict:
    """Times `call()` (which blocks): `warmup` untimed calls, then the median / min / max of `repeats` (as the
    official benchmark reports them)."""
    for _ in range(warmup):
        call()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        call()
        times.append(time.perf_counter() - t0)
    return {"median_s": statistics.median(times), "min_s": min(times), "max_s": max(times), "repeats": repeats}
