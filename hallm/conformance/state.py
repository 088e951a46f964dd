"""The kit's per-session state (options, the device under test, xfails, records), shared by the
plugin's hooks and the kit's fixtures.

Imported by the pytest plugin in every session, so it imports only the standard library, pytest and
the kit's stdlib-only modules; the device under test (and torch) loads on first use.
"""

from __future__ import annotations

import datetime
import os
import platform as _host
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from hallm.conformance import KIT_VERSION
from hallm.conformance import outcomes as oc
from hallm.conformance.xfails import XfailEntry, XfailsFileError, load_xfails

if TYPE_CHECKING:
    from hallm.conformance.target import Target

KIT_DIR = Path(__file__).resolve().parent
DEVICE_ENV = "HALLM_DEVICE"
MAX_LEVEL = 3


class KitState:
    """Per-session state of the kit (kept in `config.stash`)."""

    def __init__(self, config: pytest.Config) -> None:
        self.config = config
        self.active = False
        self.level = int(config.getoption("hallm_level"))
        self.quick = bool(config.getoption("hallm_quick"))
        self.require_device = bool(config.getoption("hallm_require_device"))
        self.report_path: str | None = config.getoption("hallm_report")
        self.xfails_file: str | None = config.getoption("hallm_xfails")
        self.xfails: list[XfailEntry] = []
        self.records: dict[str, oc.TestRecord] = {}
        self.items: dict[str, pytest.Item] = {}
        self.abort_reason: str | None = None
        self.started = time.time()
        self._target: Target | None = None

    @property
    def device_id(self) -> str:
        """The device under test: --hallm-device, else $HALLM_DEVICE."""
        device = self.config.getoption("hallm_device") or os.environ.get(DEVICE_ENV, "")
        device = device.strip()
        if not device or device == "auto":
            raise pytest.UsageError(
                "the hallm conformance kit tests one device plugin: pass --hallm-device ID "
                "(an installed device id, see `hallm plugins`), or set HALLM_DEVICE"
            )
        return device

    def target(self) -> Target:
        """The device under test, loaded on first use (this is where torch may load)."""
        if self._target is None:
            from hallm.conformance.target import Target

            self._target = Target.load(self.device_id)
        return self._target

    def activate(self) -> None:
        """The kit's tests were collected: check the options and read the xfails file."""
        if self.active:
            return
        _ = self.device_id
        if not 0 <= self.level <= MAX_LEVEL:
            raise pytest.UsageError(f"--hallm-level must be 0..{MAX_LEVEL}, got {self.level}")
        if self.xfails_file:
            try:
                self.xfails = load_xfails(self.xfails_file)
            except XfailsFileError as exc:
                raise pytest.UsageError(str(exc)) from exc
        self.active = True

    def device_unavailable(self) -> str | None:
        """The probe's reason when the plugin loaded but says the device is unusable here."""
        target = self._target
        if target is None or not target.loaded or target.available:
            return None
        return target.probe.reason if target.probe is not None else "not probed"

    def platform_if_loaded(self) -> Any:
        """The platform instance if the kit made one for an available device, else None."""
        target = self._target
        return target.instance if target is not None and target.available else None

    def meta(self) -> dict[str, Any]:
        """The report's header: versions, device, options."""
        from hallm.platforms import API_VERSION

        torch = sys.modules.get("torch")
        data: dict[str, Any] = {
            "kit_version": KIT_VERSION,
            "core_version": KIT_VERSION,
            "api_version": API_VERSION,
            "torch_version": getattr(torch, "__version__", None),
            "python_version": _host.python_version(),
            "host": _host.platform(),
            "level": self.level,
            "quick": self.quick,
            "xfails_file": self.xfails_file,
            "started": datetime.datetime.fromtimestamp(self.started).isoformat(timespec="seconds"),
            "duration_s": round(time.time() - self.started, 2),
            "abort_reason": self.abort_reason,
        }
        try:
            data.update(self.target().describe())
        except pytest.UsageError:
            data["device_id"] = None
        return data


STATE_KEY = pytest.StashKey[KitState]()


def kit_state(config: pytest.Config) -> KitState:
    """The session's kit state (the kit's fixtures and hooks share it)."""
    return config.stash[STATE_KEY]


def is_kit_item(item: pytest.Item) -> bool:
    """True for the kit's own tests (files of the hallm.conformance package)."""
    return KIT_DIR in Path(str(item.path)).resolve().parents


def kit_test_id(item: pytest.Item) -> str:
    """The id xfails entries match: "<file>::<name[params]>", independent of the rootdir."""
    return f"{Path(str(item.path)).name}::{item.name}"
