"""64 concurrent streaming clients, a quarter of which disconnect midway: every other stream
completes with exact usage, the abandoned ones are aborted, and the engine's free-block count
returns to where it started.

A stream the client leaves after its first token can still finish in the engine before the server
sees the disconnect (the client's event loop runs 64 streams and can fall a whole generation
behind on a loaded 2-core machine); such a request is then a success with its full length, not an
abort. The test counts each abandoned request as one or the other, and needs aborts to happen."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import httpx
import openai

from tests.server.utils import API_KEY, MODEL_NAME, Server, wait_until

NUM_CLIENTS = 64
OUTPUT_LEN = 12
# A request whose client gives up asks for far more, so that if it were not aborted it would keep
# the engine busy (and its blocks held) long after the others finished. The streams that leave ask
# for no max_tokens at all (the rest of the context).
LONG_OUTPUT_LEN = 200


def idle_with_free_blocks(server: Server) -> float | None:
    m = server.metrics()
    if m["hallm:num_requests_running"] or m["hallm:num_requests_waiting"]:
        return None
    return m["hallm:kv_cache_free_blocks"]


def test_64_streams_quarter_disconnect(server: Server) -> None:
    start_free = wait_until(lambda: idle_with_free_blocks(server))
    before = server.metrics()
    aborting = set(range(0, NUM_CLIENTS, 4))

    async def one(i: int, client: openai.AsyncOpenAI) -> dict[str, Any]:
        messages = [{"role": "user", "content": f"Client {i}: tell me a story about the number {i * 7}."}]
        leave = i in aborting
        stream = await client.chat.completions.create(
            model=MODEL_NAME,
            messages=messages,
            max_tokens=None if leave else OUTPUT_LEN,
            temperature=0.8,
            seed=i,
            logprobs=True,
            stream=True,
            stream_options={"include_usage": True},
            extra_body={"ignore_eos": True},
        )
        tokens, usage, finish = 0, None, None
        async for chunk in stream:
            for choice in chunk.choices:
                tokens += len(choice.logprobs.content or []) if choice.logprobs else 0
                finish = choice.finish_reason or finish
            usage = chunk.usage or usage
            if leave and tokens >= 1:
                await stream.close()  # disconnect midway
                break
        return {"left": leave, "tokens": tokens, "usage": usage, "finish": finish}

    async def main() -> list[dict[str, Any]]:
        client = openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key=API_KEY, max_retries=0, timeout=300)
        try:
            return await asyncio.gather(*(one(i, client) for i in range(NUM_CLIENTS)))
        finally:
            await client.close()

    results = asyncio.run(main())
    prompt_lens = {}
    for i, r in enumerate(results):
        if r["left"]:
            assert r["usage"] is None and r["finish"] is None
            continue
        usage = r["usage"]
        assert r["finish"] == "length", r
        assert usage is not None and usage.completion_tokens == OUTPUT_LEN == r["tokens"], r
        assert usage.total_tokens == usage.prompt_tokens + OUTPUT_LEN
        prompt_lens[i] = usage.prompt_tokens
    assert len(prompt_lens) == NUM_CLIENTS - len(aborting)

    # Abandoned streams are aborted (not run to their 200 tokens) and every block comes back.
    end_free = wait_until(lambda: idle_with_free_blocks(server), timeout=20)
    assert end_free == start_free
    m = server.metrics()

    def delta(name: str) -> float:
        return m.get(name, 0) - before.get(name, 0)

    aborted = delta("hallm:num_requests_aborted")
    assert delta("hallm:request_success_total[abort]") == aborted
    # Every abandoned request was aborted or ran to the context limit; none is lost or stuck.
    assert aborted + delta("hallm:request_success_total[length]") == NUM_CLIENTS
    assert 1 <= aborted <= len(aborting), f"{aborted} of {len(aborting)} abandoned streams aborted"
    assert m["hallm:kv_cache_usage_perc"] == 0.0


def test_non_streaming_disconnect_aborts(server: Server) -> None:
    """A client that gives up on a non-streaming request gets its sequences aborted too."""
    start_free = wait_until(lambda: idle_with_free_blocks(server))
    before = server.metrics()["hallm:num_requests_aborted"]
    body = {
        "model": MODEL_NAME,
        "prompt": "Tell me everything.",
        "max_tokens": LONG_OUTPUT_LEN,
        "n": 2,
        "ignore_eos": True,
    }

    def busy() -> bool:
        m = server.metrics()
        return m["hallm:num_requests_running"] + m["hallm:num_requests_waiting"] > 0

    async def main() -> None:
        async with httpx.AsyncClient(headers=server.headers, timeout=120) as client:
            task = asyncio.create_task(client.post(f"{server.url}/v1/completions", json=body))
            await asyncio.to_thread(wait_until, busy, 30, 0.05)
            task.cancel()  # closes the connection mid-request
            with contextlib.suppress(asyncio.CancelledError):
                await task

    asyncio.run(main())
    assert wait_until(lambda: idle_with_free_blocks(server), timeout=20) == start_free
    assert server.metrics()["hallm:num_requests_aborted"] - before == 2
