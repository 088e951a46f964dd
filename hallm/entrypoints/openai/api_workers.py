"""API server processes beyond the first (`hallm serve --api-server-count N`).

One API process is single-threaded: parsing, admission, detokenizing and streaming of every
request share one event loop, and at a burst of small-model requests that loop, not the engine,
sets how fast requests reach the engine. With N processes the first (the one `hallm serve`
runs) binds the listening socket and spawns the engine process with a socket pair for each API
server; it then spawns API servers 1..N-1 (`run_api_worker`), which load the tokenizer, attach
to the engine, and accept on the same listening socket (the kernel hands each connection to one
of them). Every process serves every route; `/metrics` sums the request-side metrics of all
(`MetricsShare`).

Lifecycle: the first process supervises. A signal that stops it (SIGTERM, Ctrl-C) is passed on
to the others, which drain their in-flight requests as it does; it shuts the engine down only
after they have exited. If one of them dies, the first process stops serving and exits 1 (a
server that silently lost part of its capacity would be worse). A worker whose parent vanished
(its pipe closes) stops too, and one that finds the engine gone answers 503s until it is stopped.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import multiprocessing
import os
import signal
import socket
import time
from typing import Any

from hallm.entrypoints.openai.engine_client import AsyncEngineClient, EngineStartError
from hallm.platforms import ConfigError

logger = logging.getLogger("hallm.serve")

#: How often an API server process writes its request-side metrics for the others' scrapes (s).
METRICS_PUBLISH_S = 1.0
#: How long the first process waits for the others to load the tokenizer and attach (s).
WORKER_START_TIMEOUT_S = 300.0


@dataclasses.dataclass
class WorkerSpec:
    """What API server process `index` (>= 1) needs; plain data, sent to it on spawn."""

    index: int
    count: int
    requests_addr: str
    outputs_addr: str
    engine_pid: int
    metrics_dir: str
    config: Any  # the EngineConfig the first process built (the device already resolved)
    options: Any  # ServeOptions
    log_level: int


def run_api_worker(spec: WorkerSpec, sockets: list[socket.socket], conn: Any) -> None:
    """Entry point of API server process `spec.index` (a spawned `multiprocessing.Process`).

    `conn` is a pipe to the first process: "ready" or an error goes back on it, and its closing
    means the first process is gone."""
    from hallm.entrypoints.event_loop import run_event_loop
    from hallm.entrypoints.openai.stop_signals import StopSignals

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("hallm").setLevel(spec.log_level)
    signals = StopSignals()
    signals.install()
    try:
        run_event_loop(_serve_worker(spec, sockets, conn, signals.serving))
    except KeyboardInterrupt:
        pass
    finally:
        conn.close()


async def _serve_worker(spec: WorkerSpec, sockets: list[socket.socket], conn: Any, on_started: Any) -> None:
    import uvicorn

    from hallm.core.model_loader import load_tokenizer
    from hallm.core.server_gc import prepare_server_gc
    from hallm.entrypoints.openai.api_server import (
        api_key_of,
        create_app,
        served_model_name,
        server_context,
        uvicorn_config,
    )
    from hallm.entrypoints.openai.metrics import ServerMetrics
    from hallm.entrypoints.openai.metrics_share import MetricsShare

    config, options = spec.config, spec.options
    loop = asyncio.get_running_loop()
    client = AsyncEngineClient(spec.log_level)
    try:
        starting = asyncio.current_task()
        assert starting is not None

        def parent_gone_while_starting() -> None:
            loop.remove_reader(conn.fileno())
            starting.cancel()

        loop.add_reader(conn.fileno(), parent_gone_while_starting)
        try:
            client.attach(spec.index, spec.requests_addr, spec.outputs_addr, spec.engine_pid)
            tokenizer = load_tokenizer(config.model.tokenizer or config.model.model)
            metrics = ServerMetrics(
                served_model_name(config), share=MetricsShare(spec.metrics_dir, spec.index, spec.count)
            )
            client.on_stats = metrics.engine_stats
            await client.start(None, [])
        except asyncio.CancelledError:
            logger.error("API server %d: the first API server process is gone; exiting", spec.index)
            return
        except Exception as exc:
            conn.send(f"{type(exc).__name__}: {exc}")
            return
        loop.remove_reader(conn.fileno())
        ctx = server_context(client, config, tokenizer, options, metrics)
        server = uvicorn.Server(uvicorn_config(create_app(ctx, api_key_of(options)), options))

        def parent_gone() -> None:
            loop.remove_reader(conn.fileno())
            logger.error("API server %d: the first API server process is gone; stopping", spec.index)
            server.should_exit = True

        loop.add_reader(conn.fileno(), parent_gone)
        prepare_server_gc()
        on_started(server)
        conn.send("ready")
        publisher = publish_metrics_periodically(metrics)
        try:
            await server.serve(sockets=sockets)
        finally:
            publisher.cancel()
            metrics.publish()
    finally:
        with contextlib.suppress(ValueError, OSError):
            loop.remove_reader(conn.fileno())
        await client.shutdown()


def publish_metrics_periodically(metrics: Any) -> asyncio.Task[None]:
    """A task writing this process's request-side metrics every `METRICS_PUBLISH_S` seconds, so
    that a scrape answered by another API server process counts them."""

    async def publish() -> None:
        while True:
            await asyncio.sleep(METRICS_PUBLISH_S)
            try:
                metrics.publish()
            except OSError as exc:  # e.g. a full /tmp: the other processes' scrapes miss ours
                logger.warning("could not publish this API server's metrics: %s", exc)

    return asyncio.get_running_loop().create_task(publish(), name="hallm-metrics-publish")


class ApiWorkers:
    """The first process's handle on API server processes 1..N-1: spawn, wait, watch, stop."""

    def __init__(
        self, client: AsyncEngineClient, config: Any, options: Any, sockets: list[socket.socket]
    ) -> None:
        self.client = client
        self.config = config
        self.options = options
        self.sockets = sockets
        self.processes: list[Any] = []
        self.conns: list[Any] = []
        #: An API server process exited while serving (the first process then exits 1).
        self.failed = False
        self._server: Any = None

    def spawn(self) -> None:
        mp = multiprocessing.get_context("spawn")
        count = len(self.client.api_addresses)
        for index in range(1, count):
            requests_addr, outputs_addr = self.client.api_addresses[index]
            spec = WorkerSpec(
                index=index,
                count=count,
                requests_addr=requests_addr,
                outputs_addr=outputs_addr,
                engine_pid=int(self.client.pid or 0),
                metrics_dir=str(self.client.tmpdir),
                config=self.config,
                options=self.options,
                log_level=logging.getLogger("hallm").level,
            )
            parent_conn, child_conn = mp.Pipe()
            process = mp.Process(
                target=run_api_worker,
                args=(spec, self.sockets, child_conn),
                name=f"hallm-api-{index}",
                daemon=True,
            )
            process.start()
            child_conn.close()
            self.processes.append(process)
            self.conns.append(parent_conn)
        logger.info("started %d more API server processes", len(self.processes))

    async def wait_ready(self, timeout: float = WORKER_START_TIMEOUT_S) -> None:
        """Until every API server process has attached to the engine; EngineStartError as soon as
        one failed or exited (with its reason), or when the time runs out."""
        deadline = time.monotonic() + timeout
        pending = dict(enumerate(zip(self.processes, self.conns, strict=True), start=1))
        while pending:
            for index, (process, conn) in list(pending.items()):
                if conn.poll():
                    try:
                        answer = conn.recv()
                    except EOFError:
                        answer = f"exited with code {process.exitcode}"
                    if answer != "ready":
                        raise EngineStartError(f"API server process {index} failed to start: {answer}")
                    del pending[index]
                elif not process.is_alive():
                    raise EngineStartError(f"API server process {index} exited with code {process.exitcode}")
            if pending and time.monotonic() > deadline:
                raise EngineStartError(
                    f"API server processes {sorted(pending)} did not start within {timeout:.0f} s"
                )
            await asyncio.sleep(0.05)

    def watch(self, server: Any) -> None:
        """From now on, the death of an API server process stops `server` (and so this one), and
        a signal that stops `server` also stops them."""
        self._server = server
        loop = asyncio.get_running_loop()
        for process in self.processes:
            loop.add_reader(process.sentinel, self._on_exit, process)
        handle_exit = server.handle_exit

        def handle_exit_and_pass_on(sig: int, frame: Any) -> None:
            self.terminate()
            handle_exit(sig, frame)

        server.handle_exit = handle_exit_and_pass_on

    def _on_exit(self, process: Any) -> None:
        asyncio.get_running_loop().remove_reader(process.sentinel)
        if self._server is not None and not self._server.should_exit:
            process.join(1)
            logger.error(
                "API server process %s exited (code %s) while serving; stopping the server",
                process.name,
                process.exitcode,
            )
            self.failed = True
            self.terminate()
            self._server.should_exit = True

    def terminate(self) -> None:
        """SIGTERM to every API server process still running: each drains as uvicorn does."""
        for process in self.processes:
            if process.is_alive():
                with contextlib.suppress(OSError):
                    os.kill(process.pid, signal.SIGTERM)

    async def stop(self, timeout: float) -> None:
        """Stop them (SIGTERM, then SIGKILL after `timeout` seconds) and wait for them."""
        loop = asyncio.get_running_loop()
        for process in self.processes:
            with contextlib.suppress(ValueError, OSError):
                loop.remove_reader(process.sentinel)
        self.terminate()
        deadline = time.monotonic() + timeout
        for process in self.processes:
            await loop.run_in_executor(None, process.join, max(0.0, deadline - time.monotonic()))
            if process.is_alive():
                logger.warning(
                    "API server process %s did not exit in %.0f s; killing it", process.name, timeout
                )
                process.kill()
                process.join(5)
        for conn in self.conns:
            conn.close()
        for sock in self.sockets:
            sock.close()


def bind_sockets(host: str, port: int) -> list[socket.socket]:
    """Listening sockets on every address `host` resolves to (as asyncio's create_server binds
    them), to be shared by all API server processes; not listening yet (connections are refused
    until the servers start). Port 0: the port the system chooses for the first address, on
    every address (`bound_port`)."""
    infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    sockets: list[socket.socket] = []
    try:
        for family, kind, proto, _, address in dict.fromkeys(infos):
            sock = socket.socket(family, kind, proto)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            if port == 0 and len(sockets) > 1:
                address = (address[0], bound_port(sockets), *address[2:])
            try:
                sock.bind(address)
            except OSError as exc:
                raise ConfigError(
                    f"cannot listen on {host or '*'} port {port}: {exc.strerror}; choose another --port "
                    "or stop what uses it"
                ) from None
            sock.set_inheritable(True)
    except BaseException:
        for sock in sockets:
            sock.close()
        raise
    return sockets


def bound_port(sockets: list[socket.socket]) -> int:
    """The port `bind_sockets`' sockets are bound to."""
    return int(sockets[0].getsockname()[1])
