"""`hallm conformance`: run the conformance kit against one device plugin.

A thin wrapper over `pytest --pyargs hallm.conformance`: it runs pytest in-process from an
empty temporary directory with a blank ini file, so the caller's pytest configuration (addopts,
conftest.py files, plugins of the current repository) cannot change what the kit does.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

#: pytest exit statuses mapped to ours: 0 conformant, 1 not conformant, 2 usage error.
_USAGE_ERROR = 4


def register(subparsers: Any) -> None:
    """Add the `conformance` subcommand."""
    parser = subparsers.add_parser(
        "conformance",
        help="run the conformance kit against a device plugin (discovery, kernels, components, end to end)",
        description=(
            "Test one installed device plugin against hallm's contracts: L0 discovery (no hardware needed), "
            "L1 attention kernels against hallm.ops.reference, L2 executor and KV connectors, L3 greedy "
            "generation against the CPU plugin. Exit status 0 only when nothing failed, no known failure "
            "passed unexpectedly and no test was aborted by a device error."
        ),
    )
    parser.add_argument(
        "--device",
        default=None,
        metavar="ID",
        help="device id of the plugin under test (default: $HALLM_DEVICE)",
    )
    parser.add_argument(
        "--level",
        type=int,
        choices=range(4),
        default=3,
        metavar="0-3",
        help="highest tier to run (default 3)",
    )
    parser.add_argument(
        "--xfails",
        default=None,
        metavar="FILE",
        help="known failures (strict: one that passes fails the run)",
    )
    parser.add_argument(
        "--report",
        default=None,
        metavar="FILE.json",
        help="write the JSON report, and the Markdown matrix as FILE.md",
    )
    parser.add_argument(
        "--quick", action="store_true", help="a covering sample of the kernel matrix instead of all of it"
    )
    parser.add_argument(
        "--require-device",
        action="store_true",
        help="fail the tests that need the device when it is unavailable, instead of skipping them",
    )
    parser.add_argument(
        "pytest_args",
        nargs=argparse.REMAINDER,
        metavar="-- PYTEST_ARGS",
        help="extra pytest arguments after --, e.g. -- -k gqa -x",
    )
    parser.set_defaults(handler=run)


@contextlib.contextmanager
def _in_directory(path: str) -> Iterator[None]:
    previous = os.getcwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(previous)


def build_args(args: argparse.Namespace, device: str, workdir: Path) -> list[str]:
    """The pytest command line for `args`, isolated in `workdir`."""
    import hallm.conformance

    kit_dir = Path(hallm.conformance.__file__).resolve().parent
    ini = workdir / "pytest.ini"
    ini.write_text("[pytest]\n", encoding="utf-8")
    argv = [
        "-c",
        str(ini),
        f"--rootdir={kit_dir.parent.parent}",
        f"--confcutdir={kit_dir}",
        "-p",
        "hallm.conformance.plugin",
        "-p",
        "no:cacheprovider",
        "--pyargs",
        "hallm.conformance",
        f"--hallm-device={device}",
        f"--hallm-level={args.level}",
        "-q",
    ]
    if args.xfails:
        argv.append(f"--hallm-xfails={os.path.abspath(args.xfails)}")
    if args.report:
        argv.append(f"--hallm-report={os.path.abspath(args.report)}")
    if args.quick:
        argv.append("--hallm-quick")
    if args.require_device:
        argv.append("--hallm-require-device")
    extra = list(args.pytest_args or [])
    return argv + (extra[1:] if extra[:1] == ["--"] else extra)


#: What `hallm conformance` prints, and exits 2 with, when the kit's dependencies are missing.
MISSING_PYTEST = (
    "hallm conformance needs pytest, which a plain `pip install hallm` does not bring: "
    "pip install 'hallm[conformance]'"
)


def run(args: argparse.Namespace) -> int:
    """Run the kit; 0 when the plugin conforms, 1 when not, 2 for a usage error."""
    from hallm.platforms import DeviceSelectionError
    from hallm.platforms.errors import HallmError

    try:
        import pytest
    except ModuleNotFoundError as exc:
        if exc.name != "pytest":
            raise
        raise HallmError(MISSING_PYTEST) from None

    device = (args.device or os.environ.get("HALLM_DEVICE") or "").strip()
    if not device or device == "auto":
        raise DeviceSelectionError(
            "hallm conformance tests one device plugin: pass --device ID (see `hallm plugins`) or set HALLM_DEVICE"
        )
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    with tempfile.TemporaryDirectory(prefix="hallm-conformance-") as tmp, _in_directory(tmp):
        code = int(pytest.main(build_args(args, device, Path(tmp))))
    if code == 0:
        return 0
    return 2 if code == _USAGE_ERROR else 1
