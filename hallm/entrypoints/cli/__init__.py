"""The `hallm` command line: `hallm COMMAND ...`.

Each subcommand is a module of this package that exposes `register(subparsers)`, which adds its
parser and sets `handler=<function(args) -> exit code>` as a default. Adding a command is adding
its module name to `SUBCOMMANDS`. Building the parser imports every subcommand module, so they
import nothing heavy at module level (torch, the engine, plugins): only inside their handler.

A `HallmError` (a user error: bad device, bad config) prints `error: <message>` and exits 2,
without a traceback; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence

from hallm.entrypoints.cli.common import add_device_arg
from hallm.platforms.errors import HallmError
from hallm.version import __version__

__all__ = ["SUBCOMMANDS", "add_device_arg", "build_parser", "main"]

#: Subcommand modules of this package, in the order `hallm --help` lists them.
SUBCOMMANDS: tuple[str, ...] = ("plugins", "generate", "chat", "serve", "bench", "conformance")

_LOG_LEVELS = ("debug", "info", "warning", "error")


def build_parser() -> argparse.ArgumentParser:
    """The `hallm` parser with every subcommand in `SUBCOMMANDS` registered."""
    parser = argparse.ArgumentParser(
        prog="hallm", description="hallm: a hardware-neutral LLM inference engine; every device is a plugin."
    )
    parser.add_argument("--version", action="version", version=f"hallm {__version__}")
    parser.add_argument(
        "--log-level",
        choices=_LOG_LEVELS,
        default="info",
        help="verbosity of hallm's log messages on stderr (default: info)",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in SUBCOMMANDS:
        importlib.import_module(f"{__name__}.{name}").register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run `hallm` with `argv` (default: sys.argv[1:]); return the exit code."""
    args = build_parser().parse_args(argv)
    # Only hallm's loggers get the chosen level; other libraries stay at warnings.
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("hallm").setLevel(args.log_level.upper())
    try:
        return int(args.handler(args))
    except HallmError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
