"""The OpenAI-compatible HTTP server behind `hallm serve` (FastAPI on uvicorn).

`run_server(engine_args, options)` builds the engine config once (the device is resolved here),
loads the tokenizer, starts the engine process, then serves until SIGTERM or SIGINT: uvicorn
stops accepting connections, lets in-flight requests finish for up to `shutdown_timeout`
seconds (then cancels them, which aborts their sequences), and the engine process is shut down;
the exit code is 0.
"""

from __future__ import annotations

import dataclasses
import functools
import hmac
import logging
import os
import time
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

from hallm.entrypoints.event_loop import run_event_loop
from hallm.entrypoints.openai.chat_request import ChatCompletionRequest
from hallm.entrypoints.openai.chat_template import check_template_request, encode_chat
from hallm.entrypoints.openai.completion_request import CompletionRequest
from hallm.entrypoints.openai.engine_client import AsyncEngineClient
from hallm.entrypoints.openai.errors import error_response, install_error_handlers
from hallm.entrypoints.openai.metrics import ServerMetrics
from hallm.entrypoints.openai.offload import WorkerPool
from hallm.entrypoints.openai.request_body import RequestError
from hallm.entrypoints.openai.serving import (
    DEFAULT_MAX_BODY_BYTES,
    ServerContext,
    json_response,
    max_chars_per_token,
)
from hallm.entrypoints.openai.serving_chat import create_chat_completion
from hallm.entrypoints.openai.serving_completion import create_completion
from hallm.entrypoints.openai.stop_signals import StopSignals
from hallm.entrypoints.openai.tokenize_request import DetokenizeRequest, TokenizeRequest
from hallm.entrypoints.openai.tool_parsers import TOOL_PARSERS
from hallm.version import __version__

logger = logging.getLogger("hallm.serve")

API_KEY_ENV = "HALLM_API_KEY"


@dataclasses.dataclass
class ServeOptions:
    """HTTP-side options of `hallm serve`; `api_key` None reads $HALLM_API_KEY."""

    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    shutdown_timeout: float = 30.0
    access_log: bool = True
    #: Run a request's own chat_template (code sent by the client); off unless the operator trusts clients.
    trust_request_chat_template: bool = False
    max_request_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    #: Time limit (s) on the work a request makes the server do: parsing, templating, tokenizing.
    request_work_timeout: float = 10.0
    #: The model's tool-call format (a name in TOOL_PARSERS); None refuses tool_choice "auto".
    tool_call_parser: str | None = None
    #: HTTP server processes sharing the listening socket and the engine (--api-server-count).
    api_server_count: int = 1


class ApiKeyMiddleware:
    """Every route under /v1 needs `Authorization: Bearer <api key>`; anything else is a 401."""

    def __init__(self, app: ASGIApp, api_key: str) -> None:
        self.app = app
        self.expected = f"Bearer {api_key}".encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"].startswith("/v1"):
            given = next((v for k, v in scope["headers"] if k == b"authorization"), b"")
            if not hmac.compare_digest(given.strip(), self.expected):
                message = (
                    "missing or invalid API key: send the header 'Authorization: Bearer <key>' with the "
                    "server's --api-key"
                )
                await error_response(401, message, code="invalid_api_key")(scope, receive, send)
                return
        await self.app(scope, receive, send)


def create_app(ctx: ServerContext, api_key: str | None = None) -> FastAPI:
    """The FastAPI app for a started engine client."""
    app = FastAPI(title="hallm", version=__version__, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.ctx = ctx
    install_error_handlers(app)
    if api_key:
        app.add_middleware(ApiKeyMiddleware, api_key=api_key)

    @app.get("/health")
    async def health() -> Response:
        if not ctx.client.is_alive:
            return error_response(
                503, f"the engine is not running: {ctx.client.error or 'dead'}", code="engine_dead"
            )
        return Response(status_code=200)

    @app.get("/version")
    async def version() -> Response:
        return json_response({"version": __version__})

    @app.get("/metrics")
    async def metrics() -> Response:
        from prometheus_client import CONTENT_TYPE_LATEST

        return Response(ctx.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models() -> Response:
        card = {
            "id": ctx.model_name,
            "object": "model",
            "created": ctx.created,
            "owned_by": "hallm",
            "root": ctx.model_root,
            "max_model_len": ctx.max_model_len,
        }
        return json_response({"object": "list", "data": [card]})

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        body = await ctx.parse(request, CompletionRequest)
        return await create_completion(ctx, body, request)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        body = await ctx.parse(request, ChatCompletionRequest)
        return await create_chat_completion(ctx, body, request)

    @app.post("/tokenize")
    async def tokenize(request: Request) -> Response:
        body = await ctx.parse(request, TokenizeRequest)
        body.refuse_unknown()
        ctx.check_model(body.model)
        if body.messages is not None:
            variables = check_template_request(
                body.chat_template, body.chat_template_kwargs, ctx.trust_request_chat_template
            )
            for m in body.messages:
                ctx.check_text(m.content, "messages")
            ids = await ctx.work.run(
                functools.partial(
                    encode_chat,
                    ctx.tokenizer,
                    [m.to_template() for m in body.messages],
                    add_special_tokens=bool(body.add_special_tokens),
                    add_generation_prompt=body.add_generation_prompt,
                    continue_final_message=body.continue_final_message,
                    chat_template=body.chat_template,
                    tools=None if not body.tools else [t.model_dump(exclude_none=True) for t in body.tools],
                    variables=variables,
                ),
                what="rendering the chat template",
            )
        elif body.prompt is not None:
            ctx.check_text(body.prompt, "prompt")
            ids = await ctx.work.run(
                functools.partial(
                    ctx.tokenizer.encode, body.prompt, add_special_tokens=body.add_special_tokens is not False
                ),
                what="tokenizing the prompt",
                interruptible=False,
            )
        else:
            raise RequestError("give either prompt or messages", "prompt")
        out: dict[str, Any] = {"count": len(ids), "max_model_len": ctx.max_model_len, "tokens": list(ids)}
        if body.return_token_strs:
            out["token_strs"] = ctx.tokenizer.convert_ids_to_tokens(list(ids))
        return json_response(out)

    @app.post("/detokenize")
    async def detokenize(request: Request) -> Response:
        body = await ctx.parse(request, DetokenizeRequest)
        body.refuse_unknown()
        ctx.check_model(body.model)
        size = len(ctx.tokenizer)
        bad = next((t for t in body.tokens if not 0 <= t < size), None)
        if bad is not None:
            raise RequestError(
                f"tokens has token id {bad}, outside the tokenizer's vocabulary [0, {size})", "tokens"
            )
        text = await ctx.work.run(ctx.tokenizer.decode, body.tokens, what="detokenizing", interruptible=False)
        return json_response({"prompt": text})

    return app


def eos_token_ids(tokenizer: Any, hf_config: Any) -> list[int]:
    """The tokenizer's and the model config's EOS ids (what `LLMEngine` stops on offline)."""
    ids: set[int] = set()
    for value in (getattr(tokenizer, "eos_token_id", None), getattr(hf_config, "eos_token_id", None)):
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, list | tuple):
            ids.update(int(v) for v in value)
    return sorted(ids)


def server_context(
    client: AsyncEngineClient, config: Any, tokenizer: Any, options: ServeOptions, metrics: ServerMetrics
) -> ServerContext:
    """What every handler of one API server process shares."""
    hf_config = config.model.hf_config
    return ServerContext(
        client=client,
        tokenizer=tokenizer,
        metrics=metrics,
        model_name=served_model_name(config),
        model_root=config.model.model,
        max_model_len=config.model.max_model_len,
        vocab_size=int(hf_config.vocab_size),
        created=int(time.time()),
        work=WorkerPool(timeout_s=options.request_work_timeout),
        tokenizer_source=config.model.tokenizer or config.model.model,
        tool_parser=None if options.tool_call_parser is None else TOOL_PARSERS[options.tool_call_parser](),
        trust_request_chat_template=options.trust_request_chat_template,
        max_body_bytes=options.max_request_body_bytes,
        max_prompt_chars=config.model.max_model_len * max_chars_per_token(tokenizer),
    )


def served_model_name(config: Any) -> str:
    return str(config.model.served_model_name or os.path.basename(config.model.model))


def uvicorn_config(app: Any, options: ServeOptions) -> Any:
    """uvicorn's settings for one API server process."""
    import uvicorn

    return uvicorn.Config(
        app,
        host=options.host,
        port=options.port,
        log_level=logging.getLevelName(max(logging.getLogger("hallm").level, logging.INFO)).lower(),
        access_log=options.access_log,
        timeout_graceful_shutdown=int(options.shutdown_timeout),
        lifespan="off",
    )


def api_key_of(options: ServeOptions) -> str | None:
    return options.api_key if options.api_key is not None else os.environ.get(API_KEY_ENV) or None


async def serve(engine_args: Any, options: ServeOptions, on_started: Any = None) -> int:
    """Start the engine process (and the other API server processes) and serve HTTP until uvicorn
    is told to stop; 1 if another API server process died meanwhile, else 0. `on_started(server)`
    is called with the uvicorn server about to run."""
    import uvicorn

    from hallm.core.model_loader import load_tokenizer
    from hallm.core.server_gc import prepare_server_gc
    from hallm.entrypoints.openai.api_workers import (
        ApiWorkers,
        bind_sockets,
        bound_port,
        publish_metrics_periodically,
    )
    from hallm.entrypoints.openai.metrics_share import MetricsShare

    count = options.api_server_count
    client = AsyncEngineClient(logging.getLogger("hallm").level)
    client.spawn(count)  # it imports the engine while this process resolves the device and the model
    workers: ApiWorkers | None = None
    sockets: list[Any] = []
    try:
        config = engine_args.create_engine_config()  # resolves the device, once, in this process
        tokenizer = load_tokenizer(config.model.tokenizer or config.model.model)
        name = served_model_name(config)
        share = None if count == 1 else MetricsShare(str(client.tmpdir), 0, count)
        metrics = ServerMetrics(name, share=share)
        client.on_stats = metrics.engine_stats
        eos = eos_token_ids(tokenizer, config.model.hf_config)
        uv_config = uvicorn_config(None, options)
        # The listening sockets, bound before the model loads (a port in use is an error now, not
        # after the load; with --port 0 the log names the port chosen), accepted on by every API
        # server process.
        sockets = bind_sockets(options.host, options.port)
        port = bound_port(sockets)
        if count > 1:
            workers = ApiWorkers(client, config, options, sockets)
            workers.spawn()  # they load the tokenizer while the engine loads the model
        await client.start(config, eos)
        if workers is not None:
            await workers.wait_ready()
        ctx = server_context(client, config, tokenizer, options, metrics)
        api_key = api_key_of(options)
        uv_config.app = create_app(ctx, api_key)
        server = uvicorn.Server(uv_config)
        if workers is not None:
            workers.watch(server)
        prepare_server_gc()
        if on_started is not None:
            on_started(server)
        logger.info(
            "serving %s on http://%s:%d/v1 (engine pid %s%s)%s",
            name,
            options.host,
            port,
            client.pid,
            f", {count} API server processes" if count > 1 else "",
            ", API key required" if api_key else "",
        )
        publisher = publish_metrics_periodically(metrics) if share is not None else None
        try:
            await server.serve(sockets=sockets)
        finally:
            if publisher is not None:
                publisher.cancel()
        return 1 if workers is not None and workers.failed else 0
    finally:
        try:
            if workers is not None:
                await workers.stop(options.shutdown_timeout + 5.0)
        finally:
            for sock in sockets:
                sock.close()
            await client.shutdown()


def run_server(engine_args: Any, options: ServeOptions) -> int:
    """Run `hallm serve`; return the exit code (0 after SIGTERM or SIGINT, 1 if another API server
    process died while serving)."""
    signals = StopSignals()
    signals.install()
    try:
        return run_event_loop(serve(engine_args, options, signals.serving))
    except KeyboardInterrupt:
        logger.info("interrupted")
    return 0
