"""The event loop of hallm's asyncio programs (the server, `hallm bench serve`)."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


def run_event_loop(main: Coroutine[Any, Any, T]) -> T:
    """Run `main` on uvloop where it is installed (a dependency off Windows), else on asyncio's own
    loop: a streamed chunk's socket write, read and task switch cost less on uvloop."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(main)
    return uvloop.run(main)
