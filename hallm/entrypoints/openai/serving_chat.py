"""POST /v1/chat/completions: messages -> chat template -> tokens, n samples, streamed or not."""

from __future__ import annotations

import functools
import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import Request
from fastapi.responses import Response, StreamingResponse

from hallm.entrypoints.openai.chat_request import ChatCompletionRequest
from hallm.entrypoints.openai.chat_template import check_template_request, encode_chat
from hallm.entrypoints.openai.request_body import RequestError
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
from hallm.entrypoints.openai.text_stream import TokenLogprob
from hallm.entrypoints.openai.tool_calls import ToolReply, finish_reason, message


def chat_logprobs(entries: list[TokenLogprob], as_ids: bool = False) -> dict[str, Any]:
    """The chat completions logprobs object."""

    def item(token_id: int, text: str, logprob: float) -> dict[str, Any]:
        label = token_label(token_id, text, as_ids)
        return {"token": label, "logprob": finite(logprob), "bytes": list(label.encode("utf-8"))}

    return {
        "content": [
            {
                **item(e.token_id, e.token, e.logprob),
                "top_logprobs": [item(tid, text, lp) for tid, text, lp in e.top],
            }
            for e in entries
        ]
    }


def tool_reply_factory(ctx: ServerContext, req: ChatCompletionRequest) -> Any:
    """A function making each choice's ToolReply; refuses auto tool choice without a parser."""
    mode = req.tool_mode
    if mode == "auto" and ctx.tool_parser is None:
        raise RequestError(
            'tool_choice "auto" needs the server to know the model\'s tool-call format: start it with '
            '--tool-call-parser (hermes, llama3_json, mistral), or use tool_choice "required", a named '
            'function, or "none"',
            "tool_choice",
        )
    named = req.named_tool().name if mode == "named" else None
    parallel = req.parallel_tool_calls is not False
    return lambda: ToolReply(mode, ctx.tool_parser, named, parallel)


async def create_chat_completion(ctx: ServerContext, req: ChatCompletionRequest, raw: Request) -> Response:
    ctx.check_model(req.model)
    new_reply = tool_reply_factory(ctx, req)
    params = req.to_sampling_params()
    variables = check_template_request(
        req.chat_template, req.chat_template_kwargs, ctx.trust_request_chat_template
    )
    ctx.check_text("".join(m.content for m in req.messages), "messages")
    ids = await ctx.work.run(
        functools.partial(
            encode_chat,
            ctx.tokenizer,
            req.template_messages(),
            add_special_tokens=req.add_special_tokens,
            add_generation_prompt=req.add_generation_prompt,
            continue_final_message=req.continue_final_message,
            chat_template=req.chat_template,
            tools=req.template_tools(),
            documents=req.documents,
            variables=variables,
        ),
        what="rendering the chat template",
    )
    ids = req.truncate(ids, ctx.max_model_len)
    ctx.check_request(ids, params, "messages")
    await ctx.check_structured_output(params, req.constraint_field())
    ctx.check_alive()
    chat_id = f"chatcmpl-{req.request_id}" if req.request_id else new_id("chatcmpl")
    head = {"id": chat_id, "created": int(time.time()), "model": ctx.model_name}
    streams = ctx.sequences("chatcmpl", [ids], params)
    want_logprobs = params.logprobs is not None
    as_ids = bool(req.return_tokens_as_token_ids)
    # echo: the reply starts with the last message's content when that message is the assistant's
    last = req.messages[-1]
    echo = last.content if req.echo and last.role == "assistant" else ""

    def total_usage(choices: list[Choice]) -> dict[str, Any]:
        return usage(len(ids), sum(c.num_tokens for c in choices), choices[0].num_cached_tokens)

    if req.stream:
        options = req.stream_options
        include_usage = options is not None and options.include_usage
        continuous = include_usage and options is not None and options.continuous_usage_stats
        chunk_head = {**head, "object": "chat.completion.chunk"}
        choices = [Choice() for _ in streams]

        def chunk(choice: dict[str, Any]) -> bytes:
            extra: dict[str, Any] = {}
            if include_usage:
                extra["usage"] = total_usage(choices) if continuous else None
            return sse({**chunk_head, "choices": [choice], **extra})

        async def stream() -> AsyncIterator[bytes]:
            replies = [new_reply() for _ in streams]
            try:
                for i in range(len(streams)):
                    delta = {"role": "assistant", "content": echo}
                    yield chunk({"index": i, "delta": delta, "logprobs": None, "finish_reason": None})
                async for i, update in merge(streams):
                    choices[i].add(update)
                    reply = replies[i]
                    deltas = reply.feed(update.text) if update.text else []
                    if update.finish_reason is not None:
                        deltas += reply.finish()
                    lp = chat_logprobs(update.logprobs, as_ids) if want_logprobs and update.logprobs else None
                    if not deltas and (lp is not None or update.finish_reason is not None):
                        deltas = [{}]
                    for j, delta in enumerate(deltas):
                        last = j == len(deltas) - 1
                        yield chunk(
                            {
                                "index": i,
                                "delta": delta,
                                "logprobs": lp if last else None,
                                "finish_reason": finish_reason(update.finish_reason, reply.calls)
                                if last
                                else None,
                                "stop_reason": update.stop_reason if last else None,
                            }
                        )
                if include_usage:
                    yield sse({**chunk_head, "choices": [], "usage": total_usage(choices)})
            except Exception as exc:
                yield sse_error(exc)
            yield SSE_DONE

        return StreamingResponse(stream(), media_type="text/event-stream")

    async def collect() -> dict[str, Any]:
        choices = await collect_choices(streams)
        out = []
        for i, c in enumerate(choices):
            content, calls = new_reply().final(echo + c.text)
            out.append(
                {
                    "index": i,
                    "message": message(content, calls),
                    "logprobs": chat_logprobs(c.logprobs, as_ids) if want_logprobs else None,
                    "finish_reason": finish_reason(c.finish_reason, calls),
                    "stop_reason": c.stop_reason,
                }
            )
        body = {**head, "object": "chat.completion", "choices": out, "usage": total_usage(choices)}
        if req.prompt_logprobs is not None:
            body["prompt_logprobs"] = vllm_prompt_logprobs(choices[0].prompt_logprobs, as_ids)
        return body

    result = await cancel_on_disconnect(raw, collect())
    return result if isinstance(result, Response) else json_response(result)
