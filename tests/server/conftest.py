"""Fixtures of the server tests: a tiny random llama served by `hallm serve` in a subprocess.

One server (with an API key) is shared by the whole directory; tests that stop or break a server
start their own through `server_factory`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.server.utils import API_KEY, Server, start_server


@pytest.fixture(scope="session")
def tiny_llama(tiny_model_dir: Callable[[str], Path]) -> Path:
    return tiny_model_dir("llama")


@pytest.fixture(scope="session")
def server_factory(
    tiny_llama: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Callable[..., Server]]:
    """`server_factory(*flags, api_key=None)` starts a server that is killed at session end."""
    started: list[Server] = []

    def make(*extra: str, api_key: str | None = None) -> Server:
        server = start_server(tiny_llama, tmp_path_factory.mktemp("server"), *extra, api_key=api_key)
        started.append(server)
        return server

    yield make
    for server in started:
        if server.proc.poll() is None:
            server.terminate(timeout=30)


@pytest.fixture(scope="session")
def server(server_factory: Callable[..., Server]) -> Server:
    """The shared server: tiny llama, API key required on /v1."""
    return server_factory(api_key=API_KEY)
