"""Where a request body is parsed: a small one on the event loop (a worker thread would wait on
the GIL behind a busy loop), a large one on the worker pool; both give the same request, and the
size cap still answers 413 before parsing."""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import AsyncIterator
from typing import Any

import pytest

from hallm.entrypoints.openai.completion_request import CompletionRequest
from hallm.entrypoints.openai.offload import WorkerPool
from hallm.entrypoints.openai.request_body import RequestError
from hallm.entrypoints.openai.serving import INLINE_PARSE_BYTES, ServerContext


class Body:
    """What `ServerContext.parse` reads of a Starlette request: its headers and body stream."""

    def __init__(self, raw: bytes) -> None:
        self.raw = raw
        self.headers = {"content-length": str(len(raw))}

    async def stream(self) -> AsyncIterator[bytes]:
        for i in range(0, len(self.raw), 65536):
            yield self.raw[i : i + 65536]


class CountingPool(WorkerPool):
    def __init__(self) -> None:
        super().__init__(num_threads=1)
        self.threads: list[str] = []

    async def run(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        def record(*a: Any) -> Any:
            self.threads.append(threading.current_thread().name)
            return fn(*a)

        return await super().run(record, *args, **kwargs)


def context(pool: WorkerPool, max_body_bytes: int = 16 * 2**20) -> ServerContext:
    return ServerContext(
        client=None,  # type: ignore[arg-type]
        tokenizer=None,
        metrics=None,  # type: ignore[arg-type]
        model_name="m",
        model_root="/m",
        max_model_len=1 << 20,
        vocab_size=1 << 20,
        created=0,
        work=pool,
        max_body_bytes=max_body_bytes,
    )


@pytest.mark.parametrize("num_ids", [1024, 40_000], ids=["small-inline", "large-offloaded"])
def test_a_body_is_parsed_inline_only_when_small(num_ids: int) -> None:
    ids = list(range(100, 100 + num_ids))
    raw = json.dumps({"model": "m", "prompt": ids, "max_tokens": 3}).encode()
    pool = CountingPool()
    req = asyncio.run(context(pool).parse(Body(raw), CompletionRequest))  # type: ignore[arg-type]
    assert req.prompts() == [ids] and req.max_tokens == 3
    if len(raw) <= INLINE_PARSE_BYTES:
        assert pool.threads == []
    else:
        assert pool.threads == ["hallm-request-work-0"]


def test_a_bad_small_body_is_a_validation_error_and_an_oversized_one_a_413() -> None:
    from pydantic import ValidationError

    pool = CountingPool()
    with pytest.raises(ValidationError, match="prompt"):
        asyncio.run(context(pool).parse(Body(b'{"model": "m", "prompt": [1, true]}'), CompletionRequest))  # type: ignore[arg-type]
    raw = json.dumps({"model": "m", "prompt": list(range(5000))}).encode()
    with pytest.raises(RequestError) as info:
        asyncio.run(context(pool, max_body_bytes=1000).parse(Body(raw), CompletionRequest))  # type: ignore[arg-type]
    assert info.value.status == 413
