"""The serving stack as `make serve` runs it, for tests: serving/entrypoint.sh with the TF
Serving stand-in behind the container's nginx config, on free 127.0.0.1 ports.

    with ServingStack(export_base) as stack:
        requests.get(stack.ping_url)
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import requests

from harness.httpserver import free_port

REPO_ROOT = Path(__file__).resolve().parents[1]
ENTRYPOINT = REPO_ROOT / "serving" / "entrypoint.sh"


def descendants(pid: int) -> list[int]:
    children_file = Path(f"/proc/{pid}/task/{pid}/children")
    children = [int(p) for p in children_file.read_text().split()] if children_file.exists() else []
    return children + [d for child in children for d in descendants(child)]


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat")
    return not (stat.exists() and stat.read_text().split(") ", 1)[1].startswith("Z"))  # zombies are gone


class ServingStack:
    """Start the entrypoint; ``wait_ready`` polls /ping and records what it answered."""

    def __init__(self, export_base: Path, model_name: str = "pet_object_detection", env: dict | None = None):
        self.nginx_port, self.tfs_port = free_port(), free_port()
        self.model_name = model_name
        self.base = f"http://127.0.0.1:{self.nginx_port}"
        self.ping_url = f"{self.base}/ping"
        self.invocations_url = f"{self.base}/invocations"
        self.tfs_url = f"http://127.0.0.1:{self.tfs_port}/v1/models/{model_name}"
        self.env = dict(os.environ, MODEL_NAME=model_name, MODEL_BASE_PATH=str(export_base),
                        NGINX_LISTEN=f"127.0.0.1:{self.nginx_port}", TFS_REST_PORT=str(self.tfs_port),
                        TFS_GRPC_PORT=str(free_port()), TFS_BIN=f"{sys.executable} -m detkit.serve.tfserving",
                        PYTHONPATH=str(REPO_ROOT))
        self.env.update(env or {})
        self.process: subprocess.Popen | None = None
        self.pings: list[int] = []  # /ping status codes seen while starting (0: no answer yet)

    def start(self) -> ServingStack:
        self.log = tempfile.TemporaryFile()  # read back by output(), gone when closed
        self.process = subprocess.Popen([str(ENTRYPOINT), "serve"], env=self.env, stdout=self.log,
                                        stderr=subprocess.STDOUT, cwd=REPO_ROOT)
        return self

    def wait_ready(self, timeout_s: float = 120) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            assert self.process.poll() is None, f"entrypoint exited {self.process.returncode}:\n{self.output()}"
            try:
                status = requests.get(self.ping_url, timeout=5).status_code
            except requests.ConnectionError:
                status = 0
            self.pings.append(status)
            if status == 200:
                return
            time.sleep(0.05)
        raise AssertionError(f"/ping never answered 200 in {timeout_s} s:\n{self.output()}")

    def output(self, last: int | None = 6000) -> str:
        """What the entrypoint and its servers printed so far (its ``last`` characters; None: all).

        Read with pread: the servers write through the same open file, at its offset, which a seek
        here would move back over what they wrote."""
        size = os.fstat(self.log.fileno()).st_size
        text = os.pread(self.log.fileno(), size, 0).decode(errors="replace")
        return text if last is None else text[-last:]

    def stop(self, timeout_s: float = 30) -> float:
        """SIGTERM the entrypoint; seconds until it and its children are gone."""
        children = descendants(self.process.pid)
        started = time.monotonic()
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=timeout_s)
        finally:
            if self.process.poll() is None:
                self.process.kill()
            for pid in children:  # never leave servers behind, even when the test fails
                if alive(pid):
                    os.kill(pid, signal.SIGKILL)
        while any(alive(pid) for pid in children) and time.monotonic() - started < timeout_s:
            time.sleep(0.05)
        self.log.close()
        return time.monotonic() - started

    def __enter__(self) -> ServingStack:
        self.start()
        try:
            self.wait_ready()
        except BaseException:
            self.stop()  # a stack that never came up must not outlive its test
            raise
        return self

    def __exit__(self, *exc) -> None:
        if self.process.poll() is None:
            self.stop()
