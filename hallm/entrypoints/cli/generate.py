"""`hallm generate --prompt TEXT`: one completion (or one chat turn with --chat)."""

from __future__ import annotations

import argparse
from typing import Any

from hallm.entrypoints.cli.engine_args import add_engine_args, engine_args_from


def register(subparsers: Any) -> None:
    p = subparsers.add_parser("generate", help="generate a completion for a prompt")
    add_engine_args(p)
    p.add_argument("--prompt", required=True, help="the prompt text")
    p.add_argument(
        "--chat", action="store_true", help="wrap the prompt as a user message in the chat template"
    )
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--sampling-seed", type=int, default=None)
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from hallm.core.admission import InvalidRequestError
    from hallm.core.sampling_params import SamplingParams
    from hallm.entrypoints.llm import LLM
    from hallm.platforms import ConfigError

    try:
        params = SamplingParams(
            max_tokens=args.max_tokens,
            temperature=args.temperature,
            top_p=args.top_p,
            top_k=args.top_k,
            seed=args.sampling_seed,
        )
    except ValueError as exc:
        raise ConfigError(str(exc)) from exc
    llm = LLM(**vars(engine_args_from(args)))
    try:
        if args.chat:
            out = llm.chat([{"role": "user", "content": args.prompt}], params, use_tqdm=False)
        else:
            out = llm.generate(args.prompt, params, use_tqdm=False)
    except InvalidRequestError as exc:
        raise ConfigError(str(exc)) from exc
    print(out[0].outputs[0].text)
    return 0
