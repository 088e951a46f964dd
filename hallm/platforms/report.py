"""Diagnostics: one row per discovered plugin, for `hallm plugins` and bug reports.

Building the report loads and probes every device plugin, but a broken plugin becomes a row
with its error, never an exception. Device plugins loaded only for the report are unregistered
again afterwards, so asking for a report does not change which plugins answer the hooks.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from hallm.platforms.contributions import attention_candidates, contributed_names
from hallm.platforms.discovery import EXTENSION_GROUP, PLATFORM_GROUP, conflict_message, discover
from hallm.platforms.errors import HallmError
from hallm.platforms.loading import (
    LoadedPlatform,
    extension_plugin_name,
    load_entry,
    load_extensions,
    loaded_platforms,
    unload_platform,
)
from hallm.platforms.probing import choose_auto, run_probes


@dataclasses.dataclass(frozen=True)
class PluginReport:
    """What is known about one entry point.

    group: "hallm.platforms" (a device plugin; `name` is the device id) or "hallm.plugins"
        (an extension). Probe fields and `api_version` are None when the plugin did not load.
    attention_backends: the platform's own, then contributed ones (device plugins only).
    contributes: an extension's "executor:NAME", "kv_connector:NAME", "model:NAME" entries.
    error: why the plugin could not be loaded or fully inspected, None when all went well.
    """

    group: str
    name: str
    distribution: str
    version: str
    module: str
    api_version: str | None = None
    auto_priority: int | None = None
    available: bool | None = None
    reason: str | None = None
    device_count: int | None = None
    attention_backends: tuple[str, ...] = ()
    contributes: tuple[str, ...] = ()
    error: str | None = None

    @property
    def is_platform(self) -> bool:
        """True for a device plugin row, False for an extension row."""
        return self.group == PLATFORM_GROUP

    def to_dict(self) -> dict[str, Any]:
        """Plain data (JSON-serializable)."""
        data = dataclasses.asdict(self)
        data["attention_backends"] = list(self.attention_backends)
        data["contributes"] = list(self.contributes)
        return data


def _error_text(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


def _backend_names(loaded: LoadedPlatform) -> tuple[tuple[str, ...], str | None]:
    try:
        return tuple(cls.name for cls in attention_candidates(loaded.platform_cls())), None
    except Exception as exc:  # a report shows a broken plugin; it does not crash on it
        return (), f"listing attention backends failed: {_error_text(exc)}"


def plugin_report(probe_timeout: float = 10.0) -> list[PluginReport]:
    """One row per device-plugin entry point (by device id), then one per extension.

    Every device plugin is loaded and probed (concurrently, `probe_timeout` seconds in all);
    every extension is loaded. Conflicting distributions each get a row with the conflict.
    """
    before = set(loaded_platforms())
    installed = discover(PLATFORM_GROUP)
    extension_errors = load_extensions()
    loaded: dict[str, LoadedPlatform] = {}
    errors: dict[str, str] = {}
    for device_id, claimants in installed.items():
        if len(claimants) > 1:
            errors[device_id] = "PluginConflictError: " + conflict_message(
                PLATFORM_GROUP, device_id, claimants
            )
            continue
        try:
            loaded[device_id] = load_entry(claimants[0])
        except HallmError as exc:
            errors[device_id] = _error_text(exc)
    try:
        probes = run_probes({i: lp.platform_cls for i, lp in loaded.items()}, probe_timeout)
        rows: list[PluginReport] = []
        for device_id, claimants in installed.items():
            for entry in claimants:
                row = PluginReport(
                    PLATFORM_GROUP,
                    device_id,
                    entry.distribution,
                    entry.version,
                    entry.value,
                    error=errors.get(device_id),
                )
                if device_id in loaded:
                    cls, probe = loaded[device_id].platform_cls, probes[device_id]
                    backends, backend_error = _backend_names(loaded[device_id])
                    row = dataclasses.replace(
                        row,
                        api_version=cls.api_version,
                        auto_priority=cls.auto_priority,
                        available=probe.available,
                        reason=probe.reason,
                        device_count=probe.device_count,
                        attention_backends=backends,
                        error=backend_error,
                    )
                rows.append(row)
        for ext_name, claimants in discover(EXTENSION_GROUP).items():
            for entry in claimants:
                error = extension_errors.get(ext_name)
                contributes: tuple[str, ...] = ()
                if error is None:
                    try:
                        contributes = tuple(contributed_names(extension_plugin_name(ext_name)))
                    except HallmError as exc:
                        error = exc
                rows.append(
                    PluginReport(
                        EXTENSION_GROUP,
                        ext_name,
                        entry.distribution,
                        entry.version,
                        entry.value,
                        contributes=contributes,
                        error=None if error is None else _error_text(error),
                    )
                )
        return rows
    finally:
        for device_id in set(loaded) - before:
            unload_platform(device_id)


def auto_choice(rows: list[PluginReport]) -> str | None:
    """The device `--device auto` would pick given these rows (None: it would fail)."""
    platform_rows = [r for r in rows if r.is_platform]
    # An id two distributions claim is disabled under auto; the others still compete.
    claimed = [r.name for r in platform_rows]
    usable = [r for r in platform_rows if claimed.count(r.name) == 1 and r.available]
    return choose_auto({r.name: r.auto_priority or 0 for r in usable})
