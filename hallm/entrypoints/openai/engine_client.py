"""The API process's handle on the engine process: start it, stream token deltas per request,
abort, watch it die, shut it down.

`AsyncEngineClient.generate(request_id, prompt_token_ids, params)` is an async iterator of lists
of `RequestDelta` (everything that arrived for the request since the consumer last looked, so a
slow consumer gets fewer, larger updates). Leaving the iteration early (a client disconnect, a
stop string, cancellation) aborts the request in the engine, which frees its KV blocks.

Transport: two ZMQ PUSH/PULL sockets over `ipc://` in a private temporary directory (mode
0700). Requests go out on a plain socket (a send never waits, so it is safe from `finally`
blocks), outputs come back on an asyncio socket read by one task that routes each delta to its
request's queue. The engine process's death is noticed at once through its sentinel.

With several API server processes, the first spawns the engine (`spawn(num_api_servers=N)`) and
the others `attach` to it with the socket pair `spawn` made for them (`api_addresses`); they
notice the engine's death through a pidfd (Linux) instead of a sentinel.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import multiprocessing
import os
import select
import shutil
import tempfile
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from hallm.core.engine_protocol import (
    AbortRequests,
    AddRequest,
    EngineFailed,
    EngineStats,
    Ready,
    RequestDelta,
    Shutdown,
    StartupFailed,
    StepOutputs,
    make_encoder,
    output_decoder,
)
from hallm.core.sampling_params import SamplingParams
from hallm.platforms import HallmError

logger = logging.getLogger("hallm.serve")


class EngineDeadError(HallmError):
    """The engine process is gone; nothing more can be served."""


class EngineStartError(HallmError):
    """The engine process could not start (the message is the engine's own error)."""


class EngineRequestError(HallmError, ValueError):
    """The engine refused a request (bad input it caught that the API process did not)."""


class AsyncEngineClient:
    """Runs `hallm.core.engine_process` in a spawned child and talks to it over ZMQ.

    `spawn()` (early, optional), then from one asyncio event loop `await start(config, eos)`,
    `generate()` / `abort()`, and `await shutdown()` at the end. `stats` is the engine's latest `EngineStats`; `ready` holds
    the KV pool's shape; `on_stats` (if set) is called with every stats update.
    """

    def __init__(self, log_level: int = logging.INFO) -> None:
        self.log_level = log_level
        #: This API server's index among the server's API processes (0 spawns the engine).
        self.index = 0
        #: (requests, outputs) address of every API server's socket pair, after `spawn`.
        self.api_addresses: list[tuple[str, str]] = []
        self._engine_pid: int | None = None
        self._pidfd: int | None = None
        self.ready: Ready | None = None
        self.stats: EngineStats | None = None
        self.on_stats: Callable[[EngineStats], None] | None = None
        self.error: str | None = None
        self._queues: dict[str, asyncio.Queue[RequestDelta | Exception]] = {}
        self._encoder = make_encoder()
        self._decoder = output_decoder()
        self._process: Any = None
        self._config_conn: Any = None
        self._reader: asyncio.Task[None] | None = None
        self._closing = False
        self._tmpdir: str | None = None
        self._sync_ctx: Any = None
        self._async_ctx: Any = None
        self._requests: Any = None
        self._outputs: Any = None

    # ---- lifecycle ------------------------------------------------------------------------

    @property
    def is_alive(self) -> bool:
        """True while the engine process runs and has not reported a failure."""
        if self.error is not None:
            return False
        if self._process is not None:
            return bool(self._process.is_alive())
        return self._engine_pid is not None  # attached: until the engine's pidfd fires

    @property
    def pid(self) -> int | None:
        return None if self._process is None else int(self._process.pid)

    @property
    def tmpdir(self) -> str | None:
        """The private directory of the sockets (mode 0700), removed at shutdown by the spawner."""
        return self._tmpdir

    def spawn(self, num_api_servers: int = 1) -> None:
        """Start the engine process early: it imports the engine while this process builds the
        config (call `start` next, from a running event loop). With `num_api_servers` > 1 the
        engine also listens to API servers 1.. that `attach` to `api_addresses[i]` later."""

        from hallm.core.engine_process import run_engine_process

        self._tmpdir = tempfile.mkdtemp(prefix="hallm-")  # mode 0700: only this user can connect
        self.api_addresses = [
            (
                f"ipc://{os.path.join(self._tmpdir, f'requests-{i}')}",
                f"ipc://{os.path.join(self._tmpdir, f'outputs-{i}')}",
            )
            for i in range(num_api_servers)
        ]
        self._bind(*self.api_addresses[0])
        mp = multiprocessing.get_context("spawn")
        self._config_conn, child_conn = mp.Pipe()
        self._process = mp.Process(
            target=run_engine_process,
            args=(
                child_conn,
                [a for a, _ in self.api_addresses],
                [b for _, b in self.api_addresses],
                self.log_level,
            ),
            name="hallm-engine",
            daemon=True,
        )
        self._process.start()
        child_conn.close()
        logger.info("engine process started (pid %d)", self._process.pid)

    def attach(self, index: int, requests_addr: str, outputs_addr: str, engine_pid: int) -> None:
        """Be API server `index` of the engine process `engine_pid` that another process spawned
        (call `start` next). Its death is watched through a pidfd (Linux 5.3+)."""
        self.index = index
        try:
            self._pidfd = os.pidfd_open(engine_pid)
        except ProcessLookupError:
            raise EngineStartError(f"the engine process (pid {engine_pid}) is gone") from None
        except (AttributeError, OSError) as exc:
            raise EngineStartError(
                f"cannot watch the engine process (pid {engine_pid}) from another API server process: "
                f"{exc}; --api-server-count above 1 needs Linux 5.3 or later (pidfd_open)"
            ) from None
        self._engine_pid = engine_pid
        self._bind(requests_addr, outputs_addr)

    def _bind(self, requests_addr: str, outputs_addr: str) -> None:
        import zmq
        import zmq.asyncio

        self._sync_ctx = zmq.Context()
        self._requests = self._sync_ctx.socket(zmq.PUSH)
        self._requests.setsockopt(zmq.SNDHWM, 0)
        self._requests.setsockopt(zmq.LINGER, 0)
        self._requests.bind(requests_addr)
        self._async_ctx = zmq.asyncio.Context()
        self._outputs = self._async_ctx.socket(zmq.PULL)
        self._outputs.setsockopt(zmq.RCVHWM, 0)
        self._outputs.bind(outputs_addr)

    async def start(self, config: Any, eos_token_ids: list[int], timeout: float = 1800.0) -> None:
        """Hand the engine process its config (built here, the device resolved here) and wait until
        it has loaded the model and sized its KV cache. Raises EngineStartError with its reason.
        An attached client (`attach`) passes no config: it waits for the engine's `Ready`."""
        if self._process is None and self._requests is None:
            self.spawn()
        if self._config_conn is not None:
            # the model config as plain values where they build the same model: the engine
            # process then never imports transformers (seconds of CPU beside this process's start)
            from hallm.core.model_loader.plain_config import with_plain_model_config

            sent = with_plain_model_config(config)
            with contextlib.suppress(OSError):  # if it died already, that is reported below
                self._config_conn.send((sent, list(eos_token_ids)))
            self._config_conn.close()
            self._config_conn = None
        deadline = time.monotonic() + timeout
        while True:
            if self._process is not None and not self._process.is_alive():
                raise EngineStartError(f"the engine process exited with code {self._process.exitcode}")
            if self._pidfd is not None and select.select([self._pidfd], [], [], 0)[0]:
                raise EngineStartError(f"the engine process (pid {self._engine_pid}) exited")
            if time.monotonic() > deadline:
                raise EngineStartError(f"the engine did not start within {timeout:.0f} s")
            try:
                raw = await asyncio.wait_for(self._outputs.recv(copy=False), timeout=0.5)
            except asyncio.TimeoutError:
                continue
            msg = self._decoder.decode(raw.buffer)
            if isinstance(msg, StartupFailed):
                raise EngineStartError(f"the engine failed to start: {msg.message}")
            if isinstance(msg, Ready):
                self.ready = msg
                self._set_stats(msg.stats)
                break
        # Sends never block (a dead peer must not hang us), so wait until the engine's inbox is
        # connected before the first request: a harmless message goes through once it is.
        while not self._send(AbortRequests([])):
            gone = self._process is not None and not self._process.is_alive()
            gone = gone or (self._pidfd is not None and bool(select.select([self._pidfd], [], [], 0)[0]))
            if gone or time.monotonic() > deadline:
                raise EngineStartError("the engine process did not connect to the API process")
            await asyncio.sleep(0.01)
        loop = asyncio.get_running_loop()
        if self._process is not None:
            loop.add_reader(self._process.sentinel, self._on_process_exit)
        elif self._pidfd is not None:  # attached: a pidfd becomes readable when the engine exits
            loop.add_reader(self._pidfd, self._on_engine_exit)
        self._reader = asyncio.create_task(self._read_outputs(), name="hallm-engine-outputs")

    def _on_engine_exit(self) -> None:
        if self._pidfd is not None:
            asyncio.get_running_loop().remove_reader(self._pidfd)
        if not self._closing:
            logger.error("the engine process (pid %s) died", self._engine_pid)
            self._fail(f"the engine process (pid {self._engine_pid}) died")
        self._engine_pid = None

    async def shutdown(self, timeout: float = 15.0) -> None:
        """Stop the engine process (politely, then by force) and release the sockets."""
        self._closing = True
        if self._config_conn is not None:  # never started: tell it to exit instead
            with contextlib.suppress(OSError):
                self._config_conn.send(None)
            self._config_conn.close()
            self._config_conn = None
        if self._pidfd is not None:
            with contextlib.suppress(ValueError, OSError):
                asyncio.get_running_loop().remove_reader(self._pidfd)
            os.close(self._pidfd)
            self._pidfd = None
        if self._process is not None:
            with contextlib.suppress(ValueError, OSError):
                asyncio.get_running_loop().remove_reader(self._process.sentinel)
            if self._process.is_alive():
                if not self._send(Shutdown()):  # its inbox is not connected yet (still importing)
                    self._process.terminate()
                await asyncio.get_running_loop().run_in_executor(None, self._process.join, timeout)
            if self._process.is_alive():
                logger.warning("the engine process did not exit in %.0f s; killing it", timeout)
                self._process.kill()
                self._process.join(5)
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._reader
        self._fail("the server is shutting down")
        for sock in (self._requests, self._outputs):
            if sock is not None:
                sock.close(linger=0)
        for ctx in (self._sync_ctx, self._async_ctx):
            if ctx is not None:
                ctx.term()
        if self._tmpdir is not None:
            shutil.rmtree(self._tmpdir, ignore_errors=True)

    # ---- requests -------------------------------------------------------------------------

    async def generate(
        self, request_id: str, prompt_token_ids: list[int], params: SamplingParams
    ) -> AsyncIterator[list[RequestDelta]]:
        """Queue one sequence (params.n must be 1) and yield its deltas until it finishes.

        Raises EngineRequestError if the engine refuses it, EngineDeadError if the engine dies.
        """
        if not self.is_alive:
            raise EngineDeadError(self.error or "the engine process is not running")
        if request_id in self._queues:
            raise EngineRequestError(f"request id {request_id!r} is already in use")
        queue: asyncio.Queue[RequestDelta | Exception] = asyncio.Queue()
        self._queues[request_id] = queue
        finished = False
        try:
            if not self._send(AddRequest(request_id, prompt_token_ids, params, self.index)):
                finished = True
                raise EngineDeadError("the engine process is not connected")
            while not finished:
                items = [await queue.get()]
                while not queue.empty():
                    items.append(queue.get_nowait())
                deltas: list[RequestDelta] = []
                for item in items:
                    if isinstance(item, Exception):
                        finished = True
                        raise item
                    if item.error is not None:
                        finished = True
                        raise EngineRequestError(item.error)
                    deltas.append(item)
                    if item.finish_reason is not None:
                        finished = True
                        break
                yield deltas
        finally:
            self._queues.pop(request_id, None)
            if not finished:
                self.abort(request_id)

    def abort(self, request_id: str) -> None:
        """Abort a request in the engine (a no-op if it already finished)."""
        if self.is_alive:
            self._send(AbortRequests([request_id]))

    # ---- internals ------------------------------------------------------------------------

    def _send(self, message: Any) -> bool:
        """Queue a message for the engine; False if no engine process is connected (never blocks)."""
        import zmq

        try:
            self._requests.send(self._encoder.encode(message), zmq.NOBLOCK, copy=False)
        except zmq.Again:
            return False
        return True

    def _set_stats(self, stats: EngineStats) -> None:
        self.stats = stats
        if self.on_stats is not None:
            self.on_stats(stats)

    async def _read_outputs(self) -> None:
        while True:
            raw = await self._outputs.recv(copy=False)
            msg = self._decoder.decode(raw.buffer)
            if isinstance(msg, StepOutputs):
                self._set_stats(msg.stats)
                for delta in msg.outputs:
                    queue = self._queues.get(delta.request_id)
                    if queue is not None:
                        queue.put_nowait(delta)
            elif isinstance(msg, EngineFailed):
                logger.error("the engine failed: %s", msg.message)
                self._fail(msg.message)

    def _on_process_exit(self) -> None:
        asyncio.get_running_loop().remove_reader(self._process.sentinel)
        if not self._closing:
            code = self._process.exitcode
            if code is None:
                self._process.join(1)
                code = self._process.exitcode
            logger.error("the engine process died (exit code %s)", code)
            self._fail(f"the engine process died (exit code {code})")

    def _fail(self, message: str) -> None:
        if self.error is None:
            self.error = message
        error = EngineDeadError(self.error)
        for queue in self._queues.values():
            queue.put_nowait(error)
