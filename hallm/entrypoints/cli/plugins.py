"""`hallm plugins`: every discovered plugin with its version, probe, backends and errors."""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from hallm.entrypoints.cli.common import positive_float

if TYPE_CHECKING:
    from hallm.platforms.registry import PluginReport


def register(subparsers: Any) -> None:
    """Add the `plugins` subcommand."""
    parser = subparsers.add_parser(
        "plugins",
        help="list device plugins and extensions: versions, probes, attention backends, load errors",
        description=(
            "Load and probe every installed device plugin (entry-point group hallm.platforms) and load every "
            "extension (hallm.plugins); show what each provides and why it is or is not usable. "
            "A broken plugin is shown with its error; it does not stop the listing."
        ),
    )
    parser.add_argument("--json", action="store_true", help="print machine-readable JSON instead of a table")
    parser.add_argument(
        "--probe-timeout",
        type=positive_float,
        default=10.0,
        metavar="S",
        help="seconds to wait for the device probes (they run concurrently; default: 10)",
    )
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    """Print the report; exit 0 even when some plugins are broken (that is what it reports)."""
    from hallm.platforms import API_VERSION
    from hallm.platforms.registry import auto_choice, plugin_report
    from hallm.version import __version__

    rows = plugin_report(probe_timeout=args.probe_timeout)
    choice = auto_choice(rows)
    if args.json:
        data = {
            "hallm_version": __version__,
            "api_version": API_VERSION,
            "auto_choice": choice,
            "plugins": [row.to_dict() for row in rows],
        }
        print(json.dumps(data, indent=2))
    else:
        print(f"hallm {__version__}, plugin API {API_VERSION}\n")
        print(format_report(rows, choice))
    return 0


def _table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """Left-aligned columns; the last column is not padded (it holds long reasons)."""
    widths = [max(len(r[i]) for r in [headers, *rows]) for i in range(len(headers) - 1)]
    return "\n".join(
        "  ".join([*(cell.ljust(w) for cell, w in zip(r[:-1], widths, strict=True)), r[-1]]).rstrip()
        for r in [headers, *rows]
    )


def _probe_cell(row: PluginReport) -> str:
    if row.available is None:
        return "not loaded"
    return f"available ({row.device_count})" if row.available else "unavailable"


def _details(row: PluginReport) -> str:
    parts = [p for p in (row.reason, None if row.error is None else f"error: {row.error}") if p]
    return "; ".join(parts) or "ok"


def format_report(rows: Sequence[PluginReport], choice: str | None) -> str:
    """The human-readable `hallm plugins` output."""
    platforms = [r for r in rows if r.is_platform]
    extensions = [r for r in rows if not r.is_platform]
    out = ["Device plugins (entry-point group hallm.platforms):"]
    if platforms:
        out.append(
            _table(
                [
                    "DEVICE",
                    "DISTRIBUTION",
                    "VERSION",
                    "API",
                    "PRIORITY",
                    "PROBE",
                    "ATTENTION BACKENDS",
                    "DETAILS",
                ],
                [
                    [
                        r.name,
                        r.distribution,
                        r.version,
                        r.api_version or "-",
                        "-" if r.auto_priority is None else str(r.auto_priority),
                        _probe_cell(r),
                        ", ".join(r.attention_backends) or "-",
                        _details(r),
                    ]
                    for r in platforms
                ],
            )
        )
    else:
        out.append("  none installed; install one, e.g. pip install 'hallm[cpu]'")
    if extensions:
        out.append("\nExtensions (entry-point group hallm.plugins):")
        out.append(
            _table(
                ["NAME", "DISTRIBUTION", "VERSION", "CONTRIBUTES", "DETAILS"],
                [
                    [r.name, r.distribution, r.version, ", ".join(r.contributes) or "-", _details(r)]
                    for r in extensions
                ],
            )
        )
    if choice:
        out.append(f"\n--device auto would choose: {choice}")
    elif len({r.name for r in platforms}) < len(platforms):
        out.append("\n--device auto would fail: two distributions claim one device id (see DETAILS)")
    elif platforms:
        out.append("\n--device auto would fail: no device plugin is usable (see DETAILS)")
    return "\n".join(out)
