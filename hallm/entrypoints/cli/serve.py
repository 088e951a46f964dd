"""`hallm serve [MODEL]`: an OpenAI-compatible HTTP server (see hallm.entrypoints.openai)."""

from __future__ import annotations

import argparse
from typing import Any

from hallm.entrypoints.cli.common import port_number, positive_float, positive_int
from hallm.entrypoints.cli.engine_args import add_engine_args, engine_args_from
from hallm.entrypoints.openai.tool_parsers import TOOL_PARSERS

#: --max-request-body-bytes's default (hallm.entrypoints.openai.serving.DEFAULT_MAX_BODY_BYTES,
#: not imported here so that `hallm --help` stays light).
DEFAULT_MAX_BODY_BYTES = 16 * 2**20


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "serve",
        help="serve a model over an OpenAI-compatible HTTP API",
        description=(
            "Serve MODEL (default: SmolLM2-135M-Instruct) on /v1/completions, /v1/chat/completions, "
            "/v1/models, /health, /metrics, /tokenize, /detokenize and /version. The engine runs in its "
            "own process. SIGTERM or Ctrl-C stops accepting, finishes (or after --shutdown-timeout "
            "aborts) what is in flight, and exits 0."
        ),
    )
    add_engine_args(p)
    g = p.add_argument_group("server")
    g.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1)")
    g.add_argument(
        "--port",
        type=port_number,
        default=8000,
        help="port to bind (default: 8000; 0: one the system chooses, logged)",
    )
    g.add_argument(
        "--api-key",
        default=None,
        help="require 'Authorization: Bearer KEY' on every /v1 route (default: $HALLM_API_KEY, else none)",
    )
    g.add_argument(
        "--shutdown-timeout",
        type=positive_float,
        default=30.0,
        metavar="S",
        help="on SIGTERM, seconds to let in-flight requests finish before aborting them (default: 30)",
    )
    g.add_argument(
        "--disable-uvicorn-access-log", action="store_true", help="do not log one line per HTTP request"
    )
    g.add_argument(
        "--trust-request-chat-template",
        action="store_true",
        help="run a chat_template sent in a request (it is code from the client; refused by default)",
    )
    g.add_argument(
        "--max-request-body-bytes",
        type=int,
        default=DEFAULT_MAX_BODY_BYTES,
        metavar="N",
        help=f"refuse larger request bodies with a 413 (default: {DEFAULT_MAX_BODY_BYTES})",
    )
    g.add_argument(
        "--tool-call-parser",
        choices=sorted(TOOL_PARSERS),
        default=None,
        help='the model\'s tool-call format, to find tool calls in replies (tool_choice "auto"); '
        'without it only "required" and named tool choices are served',
    )
    g.add_argument(
        "--request-work-timeout",
        type=positive_float,
        default=10.0,
        metavar="S",
        help="time limit on parsing, chat-template rendering and tokenizing one request; past it: 408 "
        "(default: 10)",
    )
    g.add_argument(
        "--api-server-count",
        type=positive_int,
        default=1,
        metavar="N",
        help="HTTP server processes sharing the port and the engine (default: 1). A small model at "
        "high request rates can be limited by one process's parsing, detokenizing and streaming; more "
        "processes spread that work over more cores",
    )
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from hallm.entrypoints.openai.api_server import ServeOptions, run_server
    from hallm.platforms import ConfigError

    if getattr(args, "skip_tokenizer_init", False):
        raise ConfigError(
            "hallm serve needs the tokenizer (prompts, chat templates and outputs are text); "
            "drop --skip-tokenizer-init"
        )
    options = ServeOptions(
        host=args.host,
        port=args.port,
        api_key=args.api_key,
        shutdown_timeout=args.shutdown_timeout,
        access_log=not args.disable_uvicorn_access_log,
        trust_request_chat_template=args.trust_request_chat_template,
        max_request_body_bytes=args.max_request_body_bytes,
        request_work_timeout=args.request_work_timeout,
        tool_call_parser=args.tool_call_parser,
        api_server_count=args.api_server_count,
    )
    return run_server(engine_args_from(args), options)
