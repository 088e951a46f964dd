"""POST /v1/completions: one or more prompts (text or token ids), n samples each, streamed or not."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import Request
from fastapi.responses import Response, StreamingResponse

from hallm.core.detokenizer import decode_logprob_token
from hallm.entrypoints.openai.completion_request import CompletionRequest
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
    token_label,
    usage,
    vllm_prompt_logprobs,
)
from hallm.entrypoints.openai.text_stream import SequenceUpdate, TokenLogprob

#: One row of the legacy logprobs object: (token id, text, logprob, top candidates); the prompt's
#: first token has neither logprob nor candidates.
Row = tuple[int, str, float | None, list[tuple[int, str, float]] | None]


def completion_logprobs(rows: list[Row], offset: int, as_ids: bool) -> dict[str, Any]:
    """The legacy completions logprobs object; `offset` is the text offset of the first token."""
    tokens: list[str] = []
    token_logprobs: list[float | None] = []
    top: list[dict[str, float] | None] = []
    offsets: list[int] = []
    for token_id, text, logprob, candidates in rows:
        tokens.append(token_label(token_id, text, as_ids))
        token_logprobs.append(None if logprob is None else finite(logprob))
        top.append(
            None
            if candidates is None
            else {token_label(tid, t, as_ids): finite(lp) for tid, t, lp in candidates}
        )
        offsets.append(offset)
        offset += len(text)
    return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top, "text_offset": offsets}


def output_rows(entries: list[TokenLogprob]) -> list[Row]:
    return [(e.token_id, e.token, e.logprob, e.top) for e in entries]


def prompt_rows(
    tokenizer: Any, prompt_ids: list[int], entries: list[TokenLogprob | None] | None
) -> list[Row]:
    """The echoed prompt's rows: its first token unscored, then each token with its logprob."""
    rows: list[Row] = [(prompt_ids[0], decode_logprob_token(tokenizer, prompt_ids[0]) or "", None, None)]
    for e in (entries or [])[1:]:
        if e is not None:
            rows.append((e.token_id, e.token, e.logprob, e.top))
    return rows


def encode_texts(tokenizer: Any, texts: list[str], add_special_tokens: bool = True) -> list[list[int]]:
    return [list(tokenizer.encode(t, add_special_tokens=add_special_tokens)) for t in texts]


async def create_completion(ctx: ServerContext, req: CompletionRequest, raw: Request) -> Response:
    ctx.check_model(req.model)
    params = req.to_sampling_params()
    prompt_ids: list[list[int]] = []
    prompt_texts: list[str | None] = []
    prompts = req.prompts()
    texts = [p for p in prompts if isinstance(p, str)]
    for text in texts:
        ctx.check_text(text, "prompt")
    encoded = iter(
        await ctx.work.run(
            encode_texts,
            ctx.tokenizer,
            texts,
            req.add_special_tokens,
            what="tokenizing the prompt",
            interruptible=False,
        )
        if texts
        else ()
    )
    for prompt in prompts:
        if isinstance(prompt, str):
            ids = next(encoded)
            prompt_texts.append(prompt)
        else:
            ids = list(prompt)
            prompt_texts.append(None)
        ids = req.truncate(ids, ctx.max_model_len)
        ctx.check_request(ids, params, "prompt")
        prompt_ids.append(ids)
    await ctx.check_structured_output(params, req.constraint_field())
    ctx.check_alive()
    n = params.n
    echo: list[str] = []
    if req.echo:
        echo = [
            t if t is not None else ctx.tokenizer.decode(ids)
            for t, ids in zip(prompt_texts, prompt_ids, strict=True)
        ]
    head = {
        "id": f"cmpl-{req.request_id}" if req.request_id else new_id("cmpl"),
        "object": "text_completion",
        "created": int(time.time()),
        "model": ctx.model_name,
    }
    streams = ctx.sequences("cmpl", prompt_ids, params, score_prompt_once=not req.stream)
    num_prompt_tokens = sum(len(ids) for ids in prompt_ids)
    want_logprobs = params.logprobs is not None
    want_prompt_logprobs = req.prompt_logprobs is not None
    as_ids = bool(req.return_tokens_as_token_ids)
    # echo + logprobs: the logprobs object starts with the prompt's tokens
    echo_logprobs = req.echo and want_logprobs

    def total_usage(choices: list[Choice]) -> dict[str, Any]:
        cached = sum(c.num_cached_tokens for i, c in enumerate(choices) if i % n == 0)
        return usage(num_prompt_tokens, sum(c.num_tokens for c in choices), cached)

    if req.stream:
        options = req.stream_options
        include_usage = options is not None and options.include_usage
        continuous = include_usage and options is not None and options.continuous_usage_stats

        async def stream() -> AsyncIterator[bytes]:
            choices = [Choice() for _ in streams]
            echoed = [not echo for _ in streams]
            offsets = [0 for _ in streams]

            def chunk(i: int, text: str, rows: list[Row] | None, update: SequenceUpdate | None) -> bytes:
                logprobs = None
                if rows is not None:
                    logprobs = completion_logprobs(rows, offsets[i], as_ids)
                    offsets[i] += sum(len(r[1]) for r in rows)
                c: dict[str, Any] = {
                    "index": i,
                    "text": text,
                    "logprobs": logprobs,
                    "finish_reason": None if update is None else update.finish_reason,
                    "stop_reason": None if update is None else update.stop_reason,
                }
                if update is not None and want_prompt_logprobs and update.prompt_logprobs is not None:
                    c["prompt_logprobs"] = vllm_prompt_logprobs(update.prompt_logprobs, as_ids)
                extra: dict[str, Any] = {}
                if include_usage:
                    extra["usage"] = total_usage(choices) if continuous else None
                return sse({**head, "choices": [c], **extra})

            try:
                if echo and not echo_logprobs:  # the echo goes out at once
                    for i in range(len(streams)):
                        yield chunk(i, echo[i // n], None, None)
                        echoed[i] = True
                        offsets[i] = len(echo[i // n])
                async for i, update in merge(streams):
                    choices[i].add(update)
                    if not echoed[i]:  # echo with logprobs: sent with the prompt's scores
                        rows = prompt_rows(ctx.tokenizer, prompt_ids[i // n], update.prompt_logprobs)
                        yield chunk(i, echo[i // n], rows, None)
                        echoed[i] = True
                        offsets[i] = len(echo[i // n])
                    has_logprobs = want_logprobs and bool(update.logprobs)
                    if (
                        update.text
                        or update.finish_reason is not None
                        or has_logprobs
                        or (want_prompt_logprobs and update.prompt_logprobs is not None)
                    ):
                        out_rows = output_rows(update.logprobs or []) if want_logprobs else None
                        yield chunk(i, update.text, out_rows, update)
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
            p = i // n
            scored = choices[p * n].prompt_logprobs  # the prompt is scored by its first sample
            prefix = echo[p] if echo else ""
            logprobs = None
            if want_logprobs:
                rows = output_rows(c.logprobs)
                if echo_logprobs:
                    head_rows = prompt_rows(ctx.tokenizer, prompt_ids[p], scored)
                    logprobs = completion_logprobs(head_rows + rows, 0, as_ids)
                else:
                    logprobs = completion_logprobs(rows, len(prefix), as_ids)
            choice: dict[str, Any] = {
                "index": i,
                "text": prefix + c.text,
                "logprobs": logprobs,
                "finish_reason": c.finish_reason,
                "stop_reason": c.stop_reason,
            }
            if want_prompt_logprobs:
                choice["prompt_logprobs"] = vllm_prompt_logprobs(scored, as_ids)
            out.append(choice)
        return {**head, "choices": out, "usage": total_usage(choices)}

    result = await cancel_on_disconnect(raw, collect())
    return result if isinstance(result, Response) else json_response(result)
