"""POST /v1/completions: one or more prompts (text or token ids), n samples each, streamed or not."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import Request
from fastapi.responses import Response, StreamingResponse

from hallm.entrypoints.openai.protocol import CompletionRequest
from hallm.entrypoints.openai.serving import (
    SSE_DONE,
    Choice,
    ServerContext,
    cancel_on_disconnect,
    collect_choices,
    finite,
    json_response,
    merge,
    new_id,
    sse,
    sse_error,
    usage,
)
from hallm.entrypoints.openai.text_stream import SequenceUpdate, TokenLogprob


def completion_logprobs(entries: list[TokenLogprob], offset: int) -> dict[str, Any]:
    """The legacy completions logprobs object; `offset` is the text offset of the first token."""
    tokens, token_logprobs, top, offsets = [], [], [], []
    for e in entries:
        tokens.append(e.token)
        token_logprobs.append(finite(e.logprob))
        top.append({text: finite(lp) for _, text, lp in e.top})
        offsets.append(offset)
        offset += len(e.token)
    return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top, "text_offset": offsets}


def encode_texts(tokenizer: Any, texts: list[str]) -> list[list[int]]:
    return [list(tokenizer.encode(t)) for t in texts]


async def create_completion(ctx: ServerContext, req: CompletionRequest, raw: Request) -> Response:
    ctx.check_model(req.model)
    params = req.to_sampling_params()
    prompt_ids: list[list[int]] = []
    prompt_texts: list[str | None] = []
    prompts = req.prompts()
    texts = [p for p in prompts if isinstance(p, str)]
    for text in texts:
        ctx.check_text(text, "prompt")
    encoded = iter(await ctx.work.run(encode_texts, ctx.tokenizer, texts, what="tokenizing the prompt"))
    for prompt in prompts:
        if isinstance(prompt, str):
            ids = next(encoded)
            prompt_texts.append(prompt)
        else:
            ids = list(prompt)
            prompt_texts.append(None)
        ctx.check_request(ids, params, "prompt")
        prompt_ids.append(ids)
    ctx.check_alive()
    n = params.n
    echo: list[str] = []
    if req.echo:
        echo = [
            t if t is not None else ctx.tokenizer.decode(ids)
            for t, ids in zip(prompt_texts, prompt_ids, strict=True)
        ]
    head = {
        "id": new_id("cmpl"),
        "object": "text_completion",
        "created": int(time.time()),
        "model": ctx.model_name,
    }
    streams = ctx.sequences("cmpl", prompt_ids, params)
    num_prompt_tokens = sum(len(ids) for ids in prompt_ids)
    want_logprobs = params.logprobs is not None

    def total_usage(choices: list[Choice]) -> dict[str, Any]:
        cached = sum(c.num_cached_tokens for i, c in enumerate(choices) if i % n == 0)
        return usage(num_prompt_tokens, sum(c.num_tokens for c in choices), cached)

    if req.stream:
        include_usage = req.stream_options is not None and req.stream_options.include_usage

        async def stream() -> AsyncIterator[bytes]:
            choices = [Choice() for _ in streams]
            offsets = [len(echo[i // n]) if echo else 0 for i in range(len(streams))]
            extra: dict[str, Any] = {"usage": None} if include_usage else {}

            def chunk(i: int, text: str, update: SequenceUpdate | None) -> bytes:
                logprobs = None
                if want_logprobs and update is not None and update.logprobs is not None:
                    logprobs = completion_logprobs(update.logprobs, offsets[i])
                    offsets[i] += sum(len(e.token) for e in update.logprobs)
                finish = None if update is None else update.finish_reason
                stop = None if update is None else update.stop_reason
                c = {
                    "index": i,
                    "text": text,
                    "logprobs": logprobs,
                    "finish_reason": finish,
                    "stop_reason": stop,
                }
                return sse({**head, "choices": [c], **extra})

            try:
                for i in range(len(streams)) if echo else ():
                    yield chunk(i, echo[i // n], None)
                async for i, update in merge(streams):
                    choices[i].add(update)
                    if update.text or update.finish_reason is not None or (want_logprobs and update.logprobs):
                        yield chunk(i, update.text, update)
                if include_usage:
                    yield sse({**head, "choices": [], "usage": total_usage(choices)})
            except Exception as exc:
                yield sse_error(exc)
            yield SSE_DONE

        return StreamingResponse(stream(), media_type="text/event-stream")

    async def collect() -> dict[str, Any]:
        choices = await collect_choices(streams)
        out = []
        for i, c in enumerate(choices):
            prefix = echo[i // n] if echo else ""
            logprobs = completion_logprobs(c.logprobs, len(prefix)) if want_logprobs else None
            out.append(
                {
                    "index": i,
                    "text": prefix + c.text,
                    "logprobs": logprobs,
                    "finish_reason": c.finish_reason,
                    "stop_reason": c.stop_reason,
                }
            )
        return {**head, "choices": out, "usage": total_usage(choices)}

    result = await cancel_on_disconnect(raw, collect())
    return result if isinstance(result, Response) else json_response(result)
