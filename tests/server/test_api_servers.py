"""`hallm serve --api-server-count 2`: two API server processes accept on one port and share one
engine. A request answered by either is the one server's answer (the shared single-process
server is the oracle); /metrics scraped from either counts the requests of both; SIGTERM lets a
stream in flight on the second process finish, then every process exits and the exit code is 0;
Ctrl-C (SIGINT to every process, as a terminal sends it) does the same; an API server process
that dies stops the server with exit code 1. Each time the server's private socket directory is
removed and no process is left."""

from __future__ import annotations

import http.client
import json
import signal
import socket
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil
import pytest

from hallm.entrypoints.openai.api_workers import bind_sockets, bound_port
from hallm.platforms import ConfigError
from tests.server.utils import MODEL_NAME, Server, wait_until

pytestmark = pytest.mark.timeout(300)


def api_processes(server: Server) -> list[psutil.Process]:
    """The server's processes that accept on its port (the engine process does not)."""
    root = psutil.Process(server.proc.pid)
    found = []
    for proc in [root, *root.children(recursive=True)]:
        try:
            conns = proc.net_connections(kind="tcp")
        except psutil.Error:
            continue
        if any(c.status == psutil.CONN_LISTEN and c.laddr.port == server.port for c in conns):
            found.append(proc)
    return found


def owner(processes: list[psutil.Process], server: Server, conn: http.client.HTTPConnection) -> int | None:
    """Index in `processes` of the one holding the server side of `conn`."""
    assert conn.sock is not None
    local_port = conn.sock.getsockname()[1]
    for i, proc in enumerate(processes):
        for c in proc.net_connections(kind="tcp"):
            if c.laddr.port == server.port and c.raddr and c.raddr.port == local_port:
                return i
    return None


def gone(pids: list[int]) -> bool:
    for pid in pids:
        try:
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                return False
        except psutil.Error:
            pass
    return True


def socket_dir(pid: int) -> Path:
    """The server's private directory of ZMQ sockets (where the API process binds its request socket)."""
    for c in psutil.Process(pid).net_connections(kind="unix"):
        if isinstance(c.laddr, str) and Path(c.laddr).name.startswith("requests-"):
            return Path(c.laddr).parent
    raise AssertionError(f"process {pid} has no hallm request socket")


def request(
    conn: http.client.HTTPConnection,
    method: str,
    path: str,
    body: Any = None,
    headers: dict[str, str] | None = None,
) -> tuple[int, bytes]:
    conn.request(
        method,
        path,
        body=None if body is None else json.dumps(body),
        headers={"Content-Type": "application/json", **(headers or {})},
    )
    response = conn.getresponse()
    return response.status, response.read()


def connections_on_each(server: Server, processes: list[psutil.Process]) -> list[http.client.HTTPConnection]:
    """Keep-alive connections until each API server process holds one: one per process."""
    mine: dict[int, http.client.HTTPConnection] = {}
    spare = []
    for _ in range(200):
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
        status, _ = request(conn, "GET", "/health")
        assert status == 200
        (i,) = wait_until(
            lambda conn=conn: (o,) if (o := owner(processes, server, conn)) is not None else None,
            timeout=10,
            interval=0.02,
        )
        if i in mine:
            spare.append(conn)
        else:
            mine[i] = conn
        if len(mine) == len(processes):
            break
    for conn in spare:
        conn.close()
    assert len(mine) == len(processes), "every new connection went to one API server process"
    return [mine[i] for i in range(len(processes))]


def completion(conn: http.client.HTTPConnection, prompt: str, stream: bool, headers: dict[str, str]) -> str:
    body = {"model": MODEL_NAME, "prompt": prompt, "max_tokens": 8, "temperature": 0.0, "stream": stream}
    status, raw = request(conn, "POST", "/v1/completions", body, headers)
    assert status == 200, raw
    if not stream:
        return str(json.loads(raw)["choices"][0]["text"])
    text = ""
    for line in raw.decode().splitlines():
        if line.startswith("data: ") and line != "data: [DONE]":
            text += json.loads(line[6:])["choices"][0]["text"]
    return text


def success_total(conn: http.client.HTTPConnection) -> float:
    status, raw = request(conn, "GET", "/metrics")
    assert status == 200
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in raw.decode().splitlines()
        if line.startswith("hallm:request_success_total{")
    )


def test_port_0_is_one_port_on_every_address() -> None:
    """`--port 0` on a host of several addresses (IPv4 and IPv6) listens on one port on all."""
    sockets = bind_sockets("", 0)
    try:
        if len(sockets) < 2:
            pytest.skip("this host resolves the wildcard address to one family only")
        port = bound_port(sockets)
        assert port != 0
        assert [s.getsockname()[1] for s in sockets] == [port] * len(sockets)
    finally:
        for s in sockets:
            s.close()


def test_a_port_in_use_is_a_clear_error() -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(
            ConfigError, match=f"cannot listen on 127.0.0.1 port {port}: .*choose another --port"
        ):
            bind_sockets("127.0.0.1", port)


def test_two_api_servers_answer_like_one_and_count_together(
    server_factory: Callable[..., Server], server: Server
) -> None:
    two = server_factory("--api-server-count", "2")
    processes = api_processes(two)
    assert len(processes) == 2, "expected the first process and one more accepting on the port"
    assert processes[0].pid == two.proc.pid
    conns = connections_on_each(two, processes)
    oracle = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    cases = [
        (prompt, stream) for prompt in ("The quick brown fox", "Once upon a time") for stream in (False, True)
    ]
    expected = [completion(oracle, prompt, stream, server.headers) for prompt, stream in cases]
    done = 0
    # One connection held by each API server process, used in turn: none sits idle past the
    # server's keep-alive timeout (a closed connection could not be pinned to its process again).
    for (prompt, stream), want in zip(cases, expected, strict=True):
        for conn in conns:
            assert completion(conn, prompt, stream, {}) == want
            done += 1
    # Each process counts its own requests and reads the other's within about a second.
    for conn in conns:
        wait_until(lambda conn=conn: success_total(conn) == done, timeout=15, interval=0.2)
    # SIGTERM to the first process while a stream runs on the second: the stream completes.
    streamed: list[str] = []
    body = {"model": MODEL_NAME, "prompt": "Count", "max_tokens": 200, "ignore_eos": True, "stream": True}
    conns[1].request(
        "POST", "/v1/completions", body=json.dumps(body), headers={"Content-Type": "application/json"}
    )
    response = conns[1].getresponse()
    first = response.readline()
    assert first.startswith(b"data: "), first
    reader = threading.Thread(target=lambda: streamed.append(response.read().decode()), daemon=True)
    reader.start()
    pids = [p.pid for p in psutil.Process(two.proc.pid).children(recursive=True)]
    directory = socket_dir(two.proc.pid)
    assert two.terminate(timeout=60) == 0
    reader.join(30)
    assert streamed and streamed[0].rstrip().endswith("data: [DONE]"), streamed
    tokens = [
        json.loads(line[6:])
        for line in (first.decode() + streamed[0]).splitlines()
        if line.startswith("data: {")
    ]
    assert tokens[-1]["choices"][0]["finish_reason"] == "length"
    wait_until(lambda: gone(pids), timeout=30)
    assert not directory.exists()


def test_ctrl_c_stops_every_process_and_cleans_up(server_factory: Callable[..., Server]) -> None:
    two = server_factory("--api-server-count", "2")
    assert len(api_processes(two)) == 2
    tree = [psutil.Process(two.proc.pid), *psutil.Process(two.proc.pid).children(recursive=True)]
    directory = socket_dir(two.proc.pid)
    for proc in tree:  # what a terminal's Ctrl-C does: SIGINT to the whole process group
        proc.send_signal(signal.SIGINT)
    assert two.proc.wait(60) == 0, two.log()
    wait_until(lambda: gone([p.pid for p in tree]), timeout=30)
    assert not directory.exists()
    assert "killing it" not in two.log()  # the engine exited on its Shutdown, not by force


def test_a_dead_api_server_process_stops_the_server(server_factory: Callable[..., Server]) -> None:
    two = server_factory("--api-server-count", "2")
    processes = api_processes(two)
    assert len(processes) == 2
    pids = [p.pid for p in psutil.Process(two.proc.pid).children(recursive=True)]
    directory = socket_dir(two.proc.pid)
    processes[1].send_signal(signal.SIGKILL)
    assert wait_until(lambda: two.proc.poll() is not None, timeout=60)
    assert two.proc.returncode == 1
    assert "exited (code -9) while serving" in two.log()
    wait_until(lambda: gone(pids), timeout=30)
    assert not directory.exists()


def test_api_server_count_must_be_positive() -> None:
    import subprocess
    import sys

    out = subprocess.run(
        [sys.executable, "-m", "hallm.entrypoints.cli", "serve", "--api-server-count", "0"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 2
    assert "--api-server-count: expected a whole number >= 1, got '0'" in out.stderr
