"""SIGTERM and SIGINT in a server process (`hallm serve`'s API processes), so that its cleanup
always runs: the engine process told to shut down, the other API processes stopped and waited
for, the private socket directory removed.

- Before the process serves (the engine loading), either signal stops it at once: a
  KeyboardInterrupt out of start-up, through its `finally` blocks.
- Once it serves, uvicorn installs its own handlers and drains in-flight requests; after that it
  restores these and re-raises the signal it handled. By then the drain is done: the signal only
  asks the (stopped) server to exit, instead of the interpreter's KeyboardInterrupt, which would
  cancel the cleanup mid-way.
- Between the two (after `serving`, before uvicorn's handlers), the signal asks the server to exit.
"""

from __future__ import annotations

import signal
from typing import Any


class StopSignals:
    """`install()` before start-up; `serving(server)` with the uvicorn server about to run."""

    def __init__(self) -> None:
        self.server: Any = None

    def install(self) -> None:
        signal.signal(signal.SIGTERM, self._handle)
        signal.signal(signal.SIGINT, self._handle)

    def serving(self, server: Any) -> None:
        self.server = server

    def _handle(self, signum: int, frame: Any) -> None:
        if self.server is None:
            raise KeyboardInterrupt
        self.server.should_exit = True
