"""What every endpoint shares: the server's context (engine client, tokenizer, metrics, limits),
admission checks, fan-out of a request into engine sequences, and client-disconnect handling."""

from __future__ import annotations

import asyncio
import dataclasses
import math
import uuid
from collections.abc import AsyncIterator, Awaitable
from typing import Any, TypeVar

import msgspec
from fastapi import Request
from fastapi.responses import Response
from pydantic import BaseModel

from hallm.core.admission import (
    AdmissionLimits,
    InvalidRequestError,
    check_admission,
    check_structured_output,
)
from hallm.core.sampling_params import SamplingParams
from hallm.core.structured_output import register_tokenizer
from hallm.entrypoints.openai.engine_client import AsyncEngineClient, EngineDeadError, EngineRequestError
from hallm.entrypoints.openai.errors import error_body
from hallm.entrypoints.openai.metrics import ServerMetrics
from hallm.entrypoints.openai.offload import WorkerPool
from hallm.entrypoints.openai.request_body import RequestError
from hallm.entrypoints.openai.text_stream import SequenceUpdate, TokenLogprob, stream_sequence
from hallm.entrypoints.openai.tool_parsers import ToolParser

T = TypeVar("T")
B = TypeVar("B", bound=BaseModel)

#: Default cap on a request body (--max-request-body-bytes).
DEFAULT_MAX_BODY_BYTES = 16 * 2**20
#: Bodies up to this size are parsed on the event loop (a 1,024-token prompt is ~6 KB: tens of
#: microseconds), larger ones on a worker thread. A worker thread must win the GIL back from a
#: busy event loop, which takes up to the interpreter's switch interval (5 ms) each time: under
#: load a small body's parse would wait far longer for the GIL than it takes.
INLINE_PARSE_BYTES = 64 * 2**10

#: Logprobs that JSON cannot carry (-inf) are sent as this, as vLLM does.
_MIN_LOGPROB = -9999.0


@dataclasses.dataclass
class ServerContext:
    """Everything a handler needs; built once at startup."""

    client: AsyncEngineClient
    tokenizer: Any
    metrics: ServerMetrics
    model_name: str
    model_root: str
    max_model_len: int
    vocab_size: int
    created: int
    work: WorkerPool
    #: Where the engine loads the tokenizer from (structured output binds grammars to it).
    tokenizer_source: str = ""
    #: A request's own chat_template is run only when the operator allows it.
    trust_request_chat_template: bool = False
    #: Bodies larger than this are a 413 before they are parsed.
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    #: Text longer than this cannot fit the context: a 400 before it is tokenized.
    max_prompt_chars: int = 2**62
    #: Finds tool calls in replies (--tool-call-parser); None: tool_choice "auto" is refused.
    tool_parser: ToolParser | None = None

    async def parse(self, request: Request, model: type[B]) -> B:
        """The request's JSON body as `model`: size-capped; parsed on a worker thread when it is
        larger than `INLINE_PARSE_BYTES`."""
        raw = await read_body(request, self.max_body_bytes)
        if len(raw) <= INLINE_PARSE_BYTES:
            return model.model_validate_json(raw)
        return await self.work.run(
            model.model_validate_json, raw, what="parsing the request body", interruptible=False
        )

    async def check_structured_output(self, params: SamplingParams, param: str) -> None:
        """Bind a constrained request to the model's vocabulary and compile its grammar (on a
        worker thread, cached): a schema, regex or grammar that cannot compile is a 400 saying why."""
        spec = params.structured_outputs
        if spec is None:
            return
        spec.tokenizer = self.tokenizer_source

        def check() -> None:
            register_tokenizer(self.tokenizer_source, self.tokenizer)
            try:
                check_structured_output(params, self.tokenizer_source)
            except InvalidRequestError as exc:
                raise RequestError(str(exc), param) from None

        await self.work.run(check, what="compiling the output constraint")

    def check_text(self, text: str, param: str) -> None:
        """Refuse, before tokenizing, text too long for any tokenization of it to fit the context."""
        if len(text) > self.max_prompt_chars:
            raise RequestError(
                f"the {param} has {len(text)} characters, more than any text of at most max_model_len="
                f"{self.max_model_len} tokens can have with this tokenizer ({self.max_prompt_chars}); shorten "
                f"the {param}",
                param,
                code="context_length_exceeded",
            )

    def check_model(self, model: str | None) -> None:
        """A request may omit `model`; naming another model is a 404."""
        if model is not None and model != self.model_name:
            raise RequestError(
                f"The model `{model}` does not exist; this server serves `{self.model_name}` (see /v1/models).",
                "model",
                status=404,
                code="model_not_found",
            )

    def check_alive(self) -> None:
        if not self.client.is_alive:
            raise RequestError(
                f"the engine is not running ({self.client.error or 'dead'}); restart the server",
                status=503,
                code="engine_dead",
            )

    def check_request(self, token_ids: list[int], params: SamplingParams, param: str) -> None:
        """The engine's admission check (`check_admission`), run here so that a request that can
        never run is a 400 before it reaches the engine process; the OpenAI API also refuses a
        max_tokens that runs past the context limit."""
        ready = self.client.ready
        limits = AdmissionLimits(
            max_model_len=self.max_model_len,
            vocab_size=self.vocab_size,
            block_size=None if ready is None else ready.block_size,
            num_usable_blocks=None if ready is None else ready.num_usable_blocks,
        )
        try:
            check_admission(token_ids, params, limits, what=param, max_tokens_within_context=True)
        except InvalidRequestError as exc:
            raise RequestError(str(exc), exc.param, code=exc.code) from None

    def sequences(
        self,
        prefix: str,
        prompts: list[list[int]],
        params: SamplingParams,
        score_prompt_once: bool = True,
        request_id: str | None = None,
    ) -> list[AsyncIterator[SequenceUpdate]]:
        """One engine sequence per (prompt, sample): choice index = prompt index * n + sample index.

        `score_prompt_once`: only a prompt's first sample computes its prompt logprobs (a stream,
        which sends each choice's as soon as it has them, has every sample compute them)."""
        request_id = f"{prefix}-{request_id or uuid.uuid4().hex}-{uuid.uuid4().hex[:8]}"
        out = []
        for p, ids in enumerate(prompts):
            for i in range(params.n):
                seq_params = params.child(i) if params.n > 1 else params
                if score_prompt_once and i > 0 and seq_params.prompt_logprobs is not None:
                    seq_params.prompt_logprobs = None  # the prompt is scored once, by the first sample
                out.append(
                    stream_sequence(
                        self.client, self.tokenizer, f"{request_id}-{p}-{i}", ids, seq_params, self.metrics
                    )
                )
        return out


async def read_body(request: Request, limit: int) -> bytes:
    """The body, refused with a 413 as soon as it is known to exceed `limit` bytes."""
    length = request.headers.get("content-length", "")
    too_large = RequestError(
        f"the request body is larger than the server's limit of {limit} bytes (--max-request-body-bytes)",
        status=413,
        code="request_too_large",
    )
    if length.isdigit() and int(length) > limit:
        raise too_large
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_large
        chunks.append(chunk)
    return b"".join(chunks)


def max_chars_per_token(tokenizer: Any) -> int:
    """An upper bound on the characters of text one token stands for: the longest vocabulary entry
    (byte-level and SentencePiece vocabularies spell a token with at least as many characters as
    its text has), times 4 for normalizers that fold several characters into one."""
    vocab = tokenizer.get_vocab()
    return 4 * max((len(t) for t in vocab), default=1)


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


async def merge(streams: list[AsyncIterator[T]]) -> AsyncIterator[tuple[int, T]]:
    """Interleave async iterators as their items arrive, tagged with the iterator's index.

    Closing the merged iterator (or an error in one of them) closes every iterator.
    """
    if len(streams) == 1:
        stream = streams[0]
        try:
            async for item in stream:
                yield 0, item
        finally:
            await stream.aclose()  # type: ignore[attr-defined]
        return
    queue: asyncio.Queue[tuple[int, Any]] = asyncio.Queue()
    done = object()

    async def pump(i: int, stream: AsyncIterator[T]) -> None:
        try:
            async for item in stream:
                queue.put_nowait((i, item))
            queue.put_nowait((i, done))
        except BaseException as exc:
            queue.put_nowait((i, exc))
            raise
        finally:
            await stream.aclose()  # type: ignore[attr-defined]

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    remaining = len(tasks)
    try:
        while remaining:
            i, item = await queue.get()
            if item is done:
                remaining -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield i, item
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def cancel_on_disconnect(request: Request, work: Awaitable[T]) -> T | Response:
    """Await `work`, cancelling it (which aborts its sequences) if the client disconnects first."""
    task = asyncio.ensure_future(work)
    disconnected = False

    async def watch() -> None:
        nonlocal disconnected
        while True:
            message = await request.receive()
            if message["type"] == "http.disconnect":
                disconnected = True
                task.cancel()
                return

    watcher = asyncio.create_task(watch())
    try:
        return await task
    except asyncio.CancelledError:
        if disconnected:
            return Response(status_code=499)  # nobody is listening
        raise
    finally:
        watcher.cancel()


def json_response(body: Any, status: int = 200) -> Response:
    return Response(msgspec.json.encode(body), status_code=status, media_type="application/json")


def sse(body: Any) -> bytes:
    return b"data: " + msgspec.json.encode(body) + b"\n\n"


SSE_DONE = b"data: [DONE]\n\n"


def sse_error(exc: BaseException) -> bytes:
    """An error event for a stream that has already started (the status is already 200)."""
    if isinstance(exc, RequestError):
        return sse(error_body(exc.status, exc.message, exc.param, exc.code))
    if isinstance(exc, EngineRequestError):
        return sse(error_body(400, str(exc)))
    if isinstance(exc, EngineDeadError):
        return sse(error_body(503, f"the engine stopped: {exc}", code="engine_dead"))
    return sse(error_body(500, f"internal server error: {type(exc).__name__}: {exc}"))


def engine_error(exc: EngineRequestError | EngineDeadError) -> RequestError:
    """The error answer for an engine failure before anything was sent."""
    if isinstance(exc, EngineRequestError):
        return RequestError(str(exc))
    return RequestError(f"the engine stopped: {exc}", status=503, code="engine_dead")


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int) -> dict[str, Any]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": cached_tokens},
    }


def finite(logprob: float) -> float:
    return logprob if math.isfinite(logprob) else _MIN_LOGPROB


def token_label(token_id: int, text: str | None, as_ids: bool) -> str:
    """How a token is shown in logprobs: its text, or "token_id:N" (return_tokens_as_token_ids)."""
    return f"token_id:{token_id}" if as_ids else (text or "")


def vllm_prompt_logprobs(
    entries: list[TokenLogprob | None] | None, as_ids: bool
) -> list[dict[str, dict[str, Any]] | None] | None:
    """vLLM's `prompt_logprobs`: per prompt position (None for the first), token id -> logprob,
    rank and decoded token, for the prompt token and the top candidates."""
    if entries is None:
        return None
    out: list[dict[str, dict[str, Any]] | None] = []
    for e in entries:
        if e is None:
            out.append(None)
            continue
        pos = {
            str(e.token_id): {
                "logprob": finite(e.logprob),
                "rank": e.rank,
                "decoded_token": token_label(e.token_id, e.token, as_ids),
            }
        }
        for rank, (tid, text, lp) in enumerate(e.top, start=1):
            pos.setdefault(
                str(tid),
                {"logprob": finite(lp), "rank": rank, "decoded_token": token_label(tid, text, as_ids)},
            )
        out.append(pos)
    return out


@dataclasses.dataclass
class Choice:
    """A choice being accumulated (non-streaming) or tracked (streaming)."""

    text: str = ""
    num_tokens: int = 0
    num_cached_tokens: int = 0
    logprobs: list[TokenLogprob] = dataclasses.field(default_factory=list)
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    started: bool = False
    prompt_logprobs: list[TokenLogprob | None] | None = None

    def add(self, update: SequenceUpdate) -> None:
        if update.prompt_logprobs is not None:
            self.prompt_logprobs = update.prompt_logprobs
        self.text += update.text
        self.num_tokens += len(update.token_ids)
        self.num_cached_tokens = update.num_cached_tokens
        if update.logprobs:
            self.logprobs.extend(update.logprobs)
        if update.finish_reason is not None:
            self.finish_reason, self.stop_reason = update.finish_reason, update.stop_reason


async def collect_choices(streams: list[AsyncIterator[SequenceUpdate]]) -> list[Choice]:
    """Drain every sample's stream into its Choice; engine failures become OpenAI errors."""
    choices = [Choice() for _ in streams]
    try:
        async for i, update in merge(streams):
            choices[i].add(update)
    except (EngineRequestError, EngineDeadError) as exc:
        raise engine_error(exc) from None
    return choices
