"""The `mp` executor: one worker process per tensor-parallel rank on this host.

Each rank is `python -m hallm.core.executors.rank_worker` (a fresh interpreter: it works from an
engine that is itself a daemon process, and loads only the chosen platform). The engine talks to
all ranks over one ZMQ ROUTER socket on a private IPC path: a step is pickled once and the same
bytes go to every rank; only rank 0 answers a step. The ranks meet each other in
torch.distributed over the platform's `dist_backend`.

Steps follow `ranks`' protocol (async scheduling: a rank launches step N+1, then answers step
N): a "launch" message per step, "flush" when the engine waits for the newest step; rank 0's
answers are ("ok", (step id, output)) messages, in launch order (the other ranks answer the same
way with their KV connector reports, for steps with connector instructions).

Failure: a worker that exits, or replies with an error, ends the call waiting on it with a
`WorkerDiedError` that names the rank and its exit code; `check_health` reports the same, and a
step that takes longer than `step_timeout_s` is reported as hung. `shutdown` (also run at
interpreter exit) stops every worker (terminate, then kill) and removes the socket's directory;
a worker whose engine process disappears exits by itself.
"""

from __future__ import annotations

import atexit
import logging
import os
import pickle
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from typing import Any

from hallm.core.executors.ranks import RanksExecutor, WorkerDiedError
from hallm.core.scheduler_output import SchedulerOutput
from hallm.platforms import Platform

logger = logging.getLogger("hallm.executor.mp")

_POLL_MS = 200


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


class MultiprocExecutor(RanksExecutor):
    name = "mp"
    #: Setup calls (loading a model, profiling) may take this long.
    setup_timeout_s: float = 3600.0

    def __init__(self, config: Any, platform: Platform) -> None:
        super().__init__(config, platform)
        self.world_size = int(config.parallel.tensor_parallel_size)
        self.procs: list[subprocess.Popen[bytes]] = []
        self._dir: str | None = None
        self._sock: Any = None
        self._ctx: Any = None
        self._dead: str | None = None

    # ---- lifecycle ---------------------------------------------------------------------------

    def start(self) -> None:
        import zmq

        self._dir = tempfile.mkdtemp(prefix="hallm-mp-")
        address = f"ipc://{self._dir}/ranks"
        self._ctx = zmq.Context()
        self._sock = self._ctx.socket(zmq.ROUTER)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.bind(address)
        atexit.register(self.shutdown)
        level = logging.getLevelName(logging.getLogger("hallm").getEffectiveLevel())
        for rank in range(self.world_size):
            cmd = [
                sys.executable,
                "-m",
                "hallm.core.executors.rank_worker",
                f"--address={address}",
                f"--rank={rank}",
                f"--parent-pid={os.getpid()}",
                f"--log-level={level}",
            ]
            self.procs.append(subprocess.Popen(cmd, stdin=subprocess.DEVNULL))
        self._gather(self.setup_timeout_s)  # every rank says hello
        init_method = f"tcp://127.0.0.1:{free_port()}"
        hello = pickle.dumps((self.rank_config(), self.world_size, init_method))
        self._broadcast_raw(hello)
        self._gather(self.setup_timeout_s)
        self._call_all("load_model")
        logger.info("mp executor: %d ranks up (pids %s)", self.world_size, [p.pid for p in self.procs])

    def shutdown(self) -> None:
        if self._sock is not None and self._dead is None:
            try:
                self._broadcast_raw(pickle.dumps(("shutdown", ())))
                deadline = time.monotonic() + 5
                while time.monotonic() < deadline and any(p.poll() is None for p in self.procs):
                    time.sleep(0.05)
            except Exception:
                pass
        for p in self.procs:
            if p.poll() is None:
                p.terminate()
        for p in self.procs:
            try:
                p.wait(timeout=5)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        self.procs = []
        if self._sock is not None:
            self._sock.close(0)
            self._sock = None
        if self._ctx is not None:
            self._ctx.term()
            self._ctx = None
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None
        atexit.unregister(self.shutdown)

    # ---- the contract ------------------------------------------------------------------------

    def check_health(self) -> None:
        if self._dead is not None:
            raise WorkerDiedError(self._dead)
        self._check_alive()
        started = self._oldest_unanswered()
        if started is not None and time.monotonic() - started > self.step_timeout_s:
            self._fail(f"a step has run for over {self.step_timeout_s:.0f} s: a worker is hung")

    # ---- steps -------------------------------------------------------------------------------

    def _send_launch(self, step_id: int, step: SchedulerOutput, resolve_now: bool) -> None:
        message = ("launch", (step_id, step, resolve_now))
        self._broadcast_raw(pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL))

    def _send_flush(self) -> None:
        self._broadcast_raw(pickle.dumps(("flush", ())))

    def _next_answers(self, deadline: float) -> list[tuple[int, int, Any]]:
        rank, (step_id, answer) = self._recv_any(deadline, self.step_timeout_s)
        return [(rank, step_id, answer)]

    # ---- plumbing ----------------------------------------------------------------------------

    def _fail(self, reason: str) -> None:
        self._dead = reason
        logger.error("mp executor: %s", reason)
        raise WorkerDiedError(reason)

    def _check_alive(self) -> None:
        for rank, p in enumerate(self.procs):
            code = p.poll()
            if code is not None:
                self._fail(f"tensor-parallel worker rank {rank} (pid {p.pid}) exited with code {code}")

    def _broadcast_raw(self, payload: bytes) -> None:
        if self._dead is not None:
            raise WorkerDiedError(self._dead)
        for rank in range(self.world_size):
            self._sock.send_multipart([f"rank{rank}".encode(), payload], copy=False)

    def _recv_any(self, deadline: float, timeout_s: float) -> tuple[int, Any]:
        import zmq

        if self._dead is not None:
            raise WorkerDiedError(self._dead)
        while True:
            if self._sock.poll(_POLL_MS, zmq.POLLIN):
                ident, payload = self._sock.recv_multipart()
                kind, value = pickle.loads(payload)
                if kind == "error":
                    # A rank's collective fails when a peer dies: name the dead peer first.
                    time.sleep(0.2)
                    self._check_alive()
                    self._fail(f"tensor-parallel worker {ident.decode()} failed: {value}")
                return int(ident.decode().removeprefix("rank")), value
            self._check_alive()
            if time.monotonic() > deadline:
                self._fail(
                    f"no answer from the tensor-parallel workers in {timeout_s:.0f} s: a worker is hung"
                )

    def _gather(self, timeout_s: float) -> list[Any]:
        """One reply from every rank, in rank order."""
        deadline = time.monotonic() + timeout_s
        replies: dict[int, Any] = {}
        while len(replies) < self.world_size:
            rank, value = self._recv_any(deadline, timeout_s)
            replies[rank] = value
        return [replies[r] for r in range(self.world_size)]

    def _call_all(self, method: str, *args: Any) -> list[Any]:
        self._broadcast_raw(pickle.dumps((method, args)))
        return self._gather(self.setup_timeout_s)
