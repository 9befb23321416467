"""Helpers shared by the tests: the parity-fixture root and case discovery, and the small training config.

Parity tests read fixtures from `$VAREDIT_FIXTURES` (default: tests/fixtures, copies of ../shared/fixtures).
Cases come from each folder's own index (`quantizer/cases.json`, `config.json["cases"]`, `t5/prompts.json`),
never from file names. A missing folder skips with a reason; a malformed index fails the run at collection.
"""
import json
import os
import pathlib

import numpy as np
import pytest

TESTS_DIR = pathlib.Path(__file__).resolve().parent
REPO_ROOT = TESTS_DIR.parent
DEFAULT_FIXTURES = TESTS_DIR / "fixtures"


def fixtures_root() -> pathlib.Path:
    return pathlib.Path(os.environ.get("VAREDIT_FIXTURES", DEFAULT_FIXTURES)).resolve()


def fixture_dir(name: str) -> pathlib.Path:
    """The fixture folder `name` under the root; skips the calling test when it is absent."""
    path = fixtures_root() / name
    if not path.is_dir():
        pytest.skip(f"fixture folder {name!r} is not in fixture root {fixtures_root()}")
    return path


def load_index(path: pathlib.Path):
    """Parses a fixture index; a missing or malformed index raises (the run fails, it does not skip)."""
    if not path.is_file():
        raise FileNotFoundError(f"fixture index {path} is missing")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"fixture index {path} is malformed: {e}") from e


def case_params(folder: str, index: str = "config.json", key: str | None = "cases") -> list:
    """pytest params `(folder_path, case_name, case_dict)` for every case the folder's index lists.

    Use at collection time: `@pytest.mark.parametrize("path,name,case", case_params("vae"))`.
    A missing folder yields one skipped param; a malformed index raises.
    """
    path = fixtures_root() / folder
    if not path.is_dir():
        return [pytest.param(None, None, None, id=f"{folder}-missing",
                             marks=pytest.mark.skip(reason=f"fixture folder {folder!r} not in {fixtures_root()}"))]
    data = load_index(path / index)
    cases = data[key] if key else data
    if not isinstance(cases, dict) or not cases:
        raise ValueError(f"{path / index}: expected a non-empty mapping of cases under {key!r}")
    return [pytest.param(path, name, case, id=f"{folder}-{name}") for name, case in cases.items()]


def load_npz(path: pathlib.Path) -> dict[str, np.ndarray]:
    if not path.is_file():
        raise FileNotFoundError(f"fixture file {path} is missing")
    with np.load(path, allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


# The small training config every trainer test starts from (so the toy assets and compiled steps are shared): the
# tiny default with a 2-block C 64 transformer, a 4-step toy tokenizer, 48 + 8 toy pairs, batch 8, no
# validation / samples unless a test asks.
SMALL = {"model.embed_dim": 64, "model.depth": 2, "model.num_heads": 2, "model.block_chunks": 1,
         "toy.image_tokenizer_steps": 4, "toy.num_pairs": 48, "toy.eval_pairs": 8, "batch_size": 8, "log_every": 1,
         "eval_batches": 1, "sample_every": -1, "eval_every": -1, "compilation_cache": False}


def small_config(**extra):
    """`configs/varedit_tiny.py` with `SMALL` and `extra` (dotted field -> value) applied."""
    from varedit_jax import configlib
    return configlib.override(configlib.load(REPO_ROOT / "configs/varedit_tiny.py"), {**SMALL, **extra})


def small_flags(**extra) -> list[str]:
    """`small_config(**extra)` as `--config.FIELD=VALUE` flags of the CLIs."""
    return [f"--config.{k}={v}" for k, v in {**SMALL, **extra}.items()]


def train_subprocess(args, env_extra=None, **kw):
    """`python -m varedit_jax.train --config configs/varedit_tiny.py ARGS` started in the background (stdout and
    stderr together, text)."""
    import subprocess
    import sys
    env = dict(os.environ, JAX_PLATFORMS="cpu", **(env_extra or {}))
    return subprocess.Popen([sys.executable, "-m", "varedit_jax.train", "--config",
                             str(REPO_ROOT / "configs/varedit_tiny.py"), *args], cwd=REPO_ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kw)


def final_params(workdir) -> list:
    """The leaves of the newest checkpoint's params of a training workdir (local or gs://)."""
    import jax
    from varedit_jax import checkpoint
    return jax.tree.leaves(checkpoint.load_params(workdir)[1])


def data_digests(workdir) -> dict:
    """step -> the digest of the record ids of that step's batch, from a workdir's metrics.jsonl."""
    from varedit_jax import storage
    rows = [json.loads(line) for line in (storage.path(workdir) / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["data_digest"] for r in rows if r["split"] == "train"}
