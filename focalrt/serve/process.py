"""Start `focalrt serve` as a child process on loopback and wait until it is ready (tests, benchmarks).

The server may need another interpreter than the caller's (PyTriton 0.7 needs numpy<2, see
focalrt/serve/environment.py): FOCALRT_SERVE_PYTHON names it; by default it is the caller's own.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path


def serve_python() -> str:
    return os.environ.get("FOCALRT_SERVE_PYTHON") or sys.executable


def serve_python_problem(python: str | None = None) -> str | None:
    """Why `python` cannot run the server (no PyTriton, numpy 2), or None when it can."""
    code = ("import sys, numpy\n"
            "try:\n import pytriton\nexcept ImportError:\n sys.exit('no pytriton')\n"
            "sys.exit('numpy ' + numpy.__version__ + ' (PyTriton 0.7 needs numpy<2)' "
            "if int(numpy.__version__.split('.')[0]) >= 2 else 0)\n")
    try:
        done = subprocess.run([python or serve_python(), "-c", code], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"{python or serve_python()}: {e}"
    return None if done.returncode == 0 else (done.stderr.strip().splitlines() or ["failed"])[-1]


def free_ports(n: int) -> list[int]:
    """n distinct free TCP ports on 127.0.0.1 (free when asked; the server binds them right after)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


@dataclass
class ServerProcess:
    process: subprocess.Popen
    http_port: int
    grpc_port: int
    metrics_port: int
    log_path: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def ready(self) -> bool:
        """The `describe` model is ready. Triton's server-level /v2/health/ready turns 200 a moment earlier:
        PyTriton starts Triton with no model and loads them right after."""
        try:
            with urllib.request.urlopen(f"{self.url}/v2/models/describe/ready", timeout=2) as r:
                return r.status == 200
        except OSError:
            return False

    def metrics(self) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5) as r:
            return r.read().decode()

    def stop(self, timeout_s: float = 60.0) -> int:
        """SIGTERM, then wait; SIGKILL only if it does not exit in time. Returns the exit code."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        return self.process.returncode


def start_server(bundle: str | os.PathLike, log_path: str | os.PathLike, extra_args: list[str] | None = None,
                 python: str | None = None, ready_timeout_s: float = 180.0,
                 ports: tuple[int, int, int] | None = None, wait: bool = True) -> ServerProcess:
    """Launch the server on free loopback ports (or `ports`: http, grpc, metrics) and, with `wait`, wait
    (bounded) until its `describe` model is ready."""
    http, grpc, metrics = ports or free_ports(3)
    log_path = Path(log_path)
    cmd = [python or serve_python(), "-m", "focalrt.cli", "serve", str(bundle), "--host", "127.0.0.1",
           "--http-port", str(http), "--grpc-port", str(grpc), "--metrics-port", str(metrics), *(extra_args or [])]
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    server = ServerProcess(proc, http, grpc, metrics, log_path)
    if not wait:
        return server
    deadline = time.monotonic() + ready_timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"focalrt serve exited with {proc.returncode} before it was ready:\n"
                               f"{server.log()[-4000:]}")
        if server.ready():
            return server
        time.sleep(0.5)
    server.stop()
    raise RuntimeError(f"focalrt serve was not ready after {ready_timeout_s:.0f} s:\n{server.log()[-4000:]}")
