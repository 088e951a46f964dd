"""Work a request controls (JSON parsing, chat-template rendering, tokenization) runs here, on a
few daemon threads, never on the server's event loop, so that /health, other clients and
SIGTERM are served while it runs.

Every call has a time limit. A call that passes it is answered 408 at once. Python code (a chat
template is compiled to Python by Jinja) is also stopped there: the thread traces its own
frames and raises `WorkTimeout` inside the running code at the deadline. Native code (the Rust
tokenizer) cannot be stopped, so its input is bounded before it starts (request body size,
prompt characters); its thread finishes in the background. The threads are daemons: a stuck one
never holds up the process's exit.
"""

from __future__ import annotations

import asyncio
import contextlib
import queue
import sys
import threading
import time
from collections.abc import Callable
from types import FrameType
from typing import Any, TypeVar

from hallm.entrypoints.openai.request_body import RequestError

T = TypeVar("T")

#: How many trace events pass between two reads of the clock (a read costs more than an event).
_CHECK_EVERY = 256


class WorkTimeout(BaseException):
    """Raised inside traced work at its deadline. A BaseException, so that the `except Exception`
    of the code it interrupts (Jinja, transformers) cannot swallow it."""


def call_with_deadline(fn: Callable[..., T], args: tuple[Any, ...], deadline: float) -> T:
    """Run `fn(*args)` on this thread, raising WorkTimeout inside it once time.monotonic() passes
    `deadline` (checked on the Python lines it executes)."""
    count = 0

    def tracer(frame: FrameType, event: str, arg: Any) -> Any:
        nonlocal count
        count += 1
        if count % _CHECK_EVERY == 0:
            if time.monotonic() > deadline:
                raise WorkTimeout
            # Hand the GIL over: the event loop's thread, if it waits, runs now rather than after
            # the interpreter's switch interval (which would stretch every request it serves).
            time.sleep(0)
        return tracer

    previous = sys.gettrace()
    sys.settrace(tracer)
    try:
        return fn(*args)
    finally:
        sys.settrace(previous)


class WorkerPool:
    """`await pool.run(fn, *args, what=...)`: fn(*args) on a worker thread, within `timeout_s`."""

    def __init__(self, num_threads: int = 4, timeout_s: float = 10.0) -> None:
        self.timeout_s = timeout_s
        self._jobs: queue.SimpleQueue[Callable[[], None] | None] = queue.SimpleQueue()
        self._threads = [
            threading.Thread(target=self._work, name=f"hallm-request-work-{i}", daemon=True)
            for i in range(num_threads)
        ]
        for thread in self._threads:
            thread.start()

    def _work(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            job()

    async def run(
        self, fn: Callable[..., T], *args: Any, what: str = "the request", interruptible: bool = True
    ) -> T:
        """fn(*args) off the event loop; a RequestError 408 naming `what` if it takes too long.

        `interruptible=False` runs fn untraced: for work whose cost the capped body already bounds
        (JSON parsing, tokenizing), where tracing every Python line would cost more than the work
        (a 1,024-token prompt's validation ran ~10x slower traced). Past the deadline its caller
        still gets the 408; the thread finishes in the background.

        Exceptions of fn propagate (a RequestError or a pydantic ValidationError becomes a 400)."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        deadline = time.monotonic() + self.timeout_s

        def settle(ok: bool, value: Any) -> None:
            if future.done():  # timed out (408 already sent) or cancelled (client gone)
                return
            if ok:
                future.set_result(value)
            else:
                future.set_exception(value)

        def report(ok: bool, value: Any) -> None:
            with contextlib.suppress(RuntimeError):  # the loop has closed: the server is gone
                loop.call_soon_threadsafe(settle, ok, value)

        def job() -> None:
            if time.monotonic() > deadline:  # waited in the queue past its deadline: skip it
                return
            try:
                result = call_with_deadline(fn, args, deadline) if interruptible else fn(*args)
            except WorkTimeout:
                return  # the waiting side answers 408 by itself
            except BaseException as exc:
                report(False, exc)
                return
            report(True, result)

        self._jobs.put(job)
        try:
            return await asyncio.wait_for(future, timeout=self.timeout_s)
        except asyncio.TimeoutError:
            raise RequestError(
                f"{what} took longer than the server's limit of {self.timeout_s:g} s and was stopped; "
                "send a smaller request",
                status=408,
                code="timeout",
            ) from None

    def close(self) -> None:
        for _ in self._threads:
            self._jobs.put(None)
