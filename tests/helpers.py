"""Helpers shared by the tests: the parity-fixture root and case discovery, and the small training config.

Parity tests read fixtures from `$VAREDIT_FIXTURES` (default: tests/fixtures, copies of ../shared/fixtures).
Cases come from each folder's own index (`quantizer/cases.json`, `config.json["cases"]`, `t5/prompts.json`),
never from file names. A missing folder skips with a reason; a malformed index fails the run at collection.
"""
import importlib.util
import json
import os
import pathlib
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

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
         "eval_batches": 1, "sample_every": -1, "eval_every": -1, "toy_eval_pairs": 0, "compilation_cache": False}


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


def torchvision_without_cuda_ops() -> bool:
    """Lets `import torchvision` work beside the CPU torch wheel; returns whether it had to.

    PyPI has only CUDA builds of torchvision (0.28.0 for torch 2.13.0): beside torch 2.13.0+cpu its C extension
    (_C.so, linked against libtorch_cuda) does not load, and `import torchvision` then fails in
    `_meta_registrations` ("operator torchvision::nms does not exist") - which also breaks transformers, which imports
    torchvision when it is installed. Defining the schemas of the two operators it registers unguarded (nms, qnms)
    makes the import work; the pure-Python models (SqueezeNet for lpips) need none of the C ops. Does nothing when
    torchvision is absent or its extension loads.
    """
    spec = importlib.util.find_spec("torchvision")
    if spec is None or not spec.submodule_search_locations:
        return False
    import torch
    library = next(pathlib.Path(spec.submodule_search_locations[0]).glob("_C*.so"), None)
    try:
        torch.ops.load_library(str(library))
        return False
    except (OSError, RuntimeError, TypeError):
        pass
    lib = torch.library.Library("torchvision", "DEF")
    for op in ("nms", "qnms"):
        lib.define(f"{op}(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    torchvision_without_cuda_ops.library = lib  # kept alive: the schemas live as long as the Library object
    return True


class FakeServer:
    """A fake OpenAI-compatible chat-completions endpoint on 127.0.0.1 (a daemon thread; `close()` stops it).

    replies[instruction] = text, or an int HTTP status, for prompts ending in "Editing instruction: <instruction>";
    fail_first[instruction] = n answers 500 to the first n requests of that instruction; `route(text, body)` (if set)
    answers any other prompt (text or status). Every request is recorded in `requests`."""

    def __init__(self, route=None):
        self.replies, self.fail_first, self.requests = {}, {}, []
        self.lock = threading.Lock()
        self.in_flight = self.max_in_flight = 0
        self.delay = 0.0
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                text = body["messages"][0]["content"][0]["text"]
                instruction = text.rsplit("Editing instruction: ", 1)[-1].strip()
                with server.lock:
                    server.requests.append(dict(path=self.path, body=body, auth=self.headers.get("Authorization")))
                    server.in_flight += 1
                    server.max_in_flight = max(server.max_in_flight, server.in_flight)
                    failures = server.fail_first.get(instruction, 0)
                    server.fail_first[instruction] = max(failures - 1, 0)
                time.sleep(server.delay)
                routed = route(text, body) if route is not None else None
                reply = 500 if failures else routed if routed is not None else server.replies.get(
                    instruction, '{"score": [5, 5]}')
                with server.lock:
                    server.in_flight -= 1
                if isinstance(reply, int):
                    self.send_response(reply)
                    self.end_headers()
                    self.wfile.write(b'{"error": "canned failure"}')
                    return
                data = json.dumps({"choices": [{"message": {"role": "assistant", "content": reply}}]}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.timeout = 5
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs=dict(poll_interval=0.05), daemon=True)
        self.thread.start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=5)
