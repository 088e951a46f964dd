"""Arguments shared by several subcommands."""

from __future__ import annotations

import argparse


def add_device_arg(parser: argparse.ArgumentParser) -> None:
    """Add `--device ID` (default None: `$HALLM_DEVICE` if set, else auto).

    Pass `args.device` to `hallm.platforms.registry.select_platform`, which applies that default.
    """
    parser.add_argument(
        "--device",
        default=None,
        metavar="ID",
        help=(
            "device to run on: an installed device plugin's id (see `hallm plugins`; e.g. cpu, cuda, rocm, "
            "tpu, neuron, xpu) or 'auto' to probe every installed plugin and take the best available one. "
            "Default: $HALLM_DEVICE if set, else auto. An explicit id never falls back to another device."
        ),
    )


def positive_float(text: str) -> float:
    """argparse type: a number > 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {text!r}")
    return value


def positive_int(text: str) -> int:
    """argparse type: a whole number >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}")
    return value


def port_number(text: str) -> int:
    """argparse type: a TCP port, 0-65535 (0: one the system chooses)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a port number, got {text!r}") from None
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"expected a port in 0-65535, got {text!r}")
    return value
