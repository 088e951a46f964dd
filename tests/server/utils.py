"""Helpers of the server tests: `hallm serve` in a subprocess on a loopback port it chooses
(`--port 0`; the port is read from its "serving ... on http://host:port/v1" log line)."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

API_KEY = "test-key-123"
MODEL_NAME = "tiny-llama"
MAX_MODEL_LEN = 256
NUM_BLOCKS = 512
BLOCK_SIZE = 16


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Server:
    """A `hallm serve` subprocess; `url` is its root (no /v1), `log()` its output so far."""

    def __init__(self, proc: subprocess.Popen[bytes], port: int, log_path: Path, api_key: str | None) -> None:
        self.proc = proc
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.log_path = log_path
        self.api_key = api_key

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def engine_pid(self) -> int:
        match = re.search(r"engine process started \(pid (\d+)\)", self.log())
        assert match, f"no engine pid in the server log:\n{self.log()}"
        return int(match.group(1))

    def metrics(self) -> dict[str, float]:
        """Unlabelled view of /metrics: series name (labels dropped, except finished_reason) -> value."""
        text = httpx.get(f"{self.url}/metrics", timeout=10).text
        out: dict[str, float] = {}
        for line in text.splitlines():
            if line.startswith("#") or not line.strip():
                continue
            name, value = line.rsplit(" ", 1)
            reason = re.search(r'finished_reason="(\w+)"', name)
            key = name.split("{", 1)[0] + (f"[{reason.group(1)}]" if reason else "")
            out[key] = float(value)
        return out

    def terminate(self, timeout: float = 60.0) -> int:
        """SIGTERM, then wait for the exit code (kill after `timeout`)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
            raise AssertionError(
                f"the server did not exit {timeout} s after SIGTERM:\n{self.log()}"
            ) from None


def start_server(
    model_dir: Path, log_dir: Path, *extra: str, api_key: str | None = None, timeout: float = 240.0
) -> Server:
    """Start `hallm serve --port 0`, read its port from the log, and wait until /health answers 200."""
    cmd = [
        sys.executable,
        "-m",
        "hallm.entrypoints.cli",
        "serve",
        str(model_dir),
        "--device",
        "cpu",
        "--dtype",
        "float32",
        "--host",
        "127.0.0.1",
        "--port",
        "0",
        "--served-model-name",
        MODEL_NAME,
        "--max-model-len",
        str(MAX_MODEL_LEN),
        "--block-size",
        str(BLOCK_SIZE),
        "--num-gpu-blocks-override",
        str(NUM_BLOCKS),
        "--disable-uvicorn-access-log",
        *extra,
    ]
    if api_key:
        cmd += ["--api-key", api_key]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    env.pop("HALLM_API_KEY", None)
    log_path = Path(tempfile.mkstemp(prefix="server-", suffix=".log", dir=log_dir)[1])
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=Path(__file__).parents[2]
        )
    server: Server | None = None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"the server exited with {proc.returncode}:\n{_read(log_path)}")
        if server is None:
            match = re.search(r"serving \S+ on http://127\.0\.0\.1:(\d+)/v1", _read(log_path))
            if match:
                server = Server(proc, int(match.group(1)), log_path, api_key)
        if server is not None:
            try:
                if httpx.get(f"{server.url}/health", timeout=2).status_code == 200:
                    return server
            except httpx.HTTPError:
                pass
        time.sleep(0.2)
    proc.kill()
    proc.wait(10)
    raise AssertionError(f"the server did not become healthy in {timeout} s:\n{_read(log_path)}")


def _read(path: Path) -> str:
    return path.read_text(errors="replace")


def wait_until(predicate: Callable[[], Any], timeout: float = 30.0, interval: float = 0.1) -> Any:
    """Poll until `predicate()` is truthy; return its value (or fail)."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {predicate}")
        time.sleep(interval)
