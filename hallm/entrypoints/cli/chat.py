"""`hallm chat`: an interactive conversation with a model (reads stdin line by line)."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from hallm.entrypoints.cli.engine_args import add_engine_args, engine_args_from


def register(subparsers: Any) -> None:
    p = subparsers.add_parser("chat", help="chat with a model interactively (empty line or Ctrl-D ends)")
    add_engine_args(p)
    p.add_argument("--system", default=None, help="a system prompt")
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0)
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from hallm.core.sampling_params import SamplingParams
    from hallm.entrypoints.llm import LLM

    llm = LLM(**vars(engine_args_from(args)))
    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature)
    messages: list[dict[str, str]] = []
    if args.system:
        messages.append({"role": "system", "content": args.system})
    interactive = sys.stdin.isatty()
    while True:
        if interactive:
            print("> ", end="", flush=True)
        line = sys.stdin.readline()
        if not line or not line.strip():
            return 0
        messages.append({"role": "user", "content": line.strip()})
        reply = llm.chat(messages, params, use_tqdm=False)[0].outputs[0].text
        print(reply, flush=True)
        messages.append({"role": "assistant", "content": reply})
