"""Real `ctcspec serve` processes for tests: on a free loopback port, stopped (SIGTERM) when done."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import requests

API_KEY = "test-key"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, process: subprocess.Popen, port: int, log: Path):
        self.process, self.port, self.log = process, port, log
        self.url = f"http://127.0.0.1:{port}"

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self, timeout: float = 60) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout=timeout)


def start_server(model_dir, log: Path, *flags: str, timeout: float = 180) -> Server:
    """`ctcspec serve --model model_dir --api-key test-key` on a free port, once /health answers."""
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # CTCSPEC_HOME: conftest's private home, inherited
    with open(log, "w") as out:
        process = subprocess.Popen([sys.executable, "-m", "ctcspec", "serve", "--model", str(model_dir),
                                    "--port", str(port), "--api-key", API_KEY, *flags],
                                   stdout=out, stderr=subprocess.STDOUT, env=env)
    server = Server(process, port, log)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the server exited with {process.returncode}:\n{server.output()}")
        try:
            if requests.get(server.url + "/health", timeout=1).ok:
                return server
        except requests.ConnectionError:
            pass
        time.sleep(0.2)
    server.stop()
    raise RuntimeError(f"the server did not answer within {timeout} s:\n{server.output()}")


@contextmanager
def running_server(model_dir, log: Path, *flags: str):
    server = start_server(model_dir, log, *flags)
    try:
        yield server
    finally:
        server.stop()
