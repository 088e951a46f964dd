"""Device selection, and the one module the rest of hallm imports plugin machinery from.

`select_platform()` resolves `--device` / `HALLM_DEVICE` / auto once, in the parent process,
into a `PlatformChoice`; `PlatformChoice.to_dict()` travels to child processes, which call
`platform_from_choice(data)` to load exactly that plugin without probing again.

The pieces live in their own modules and are re-exported here:
discovery (metadata only), loading (import + pluggy registration + checks), probing (isolated
probes), contributions (hook answers) and report (`hallm plugins`).
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Mapping
from typing import Any

from hallm.platforms.contributions import (
    attention_candidates,
    contributed_attention_backends,
    executors,
    kv_connectors,
    models,
)
from hallm.platforms.discovery import (
    EXTENSION_GROUP,
    FIRST_PARTY_DEVICES,
    PLATFORM_GROUP,
    PluginEntry,
    conflict_message,
    describe_installed,
    discover,
    install_hint,
)
from hallm.platforms.errors import DeviceSelectionError, HallmError
from hallm.platforms.loading import (
    LoadedPlatform,
    load_entry,
    load_extensions,
    load_platform,
    load_platform_entry,
    loadable_platforms,
    loaded_platforms,
    plugin_manager,
    unload_platform,
)
from hallm.platforms.platform import Platform, Probe
from hallm.platforms.probing import (
    HungProbes,
    choose_auto,
    run_probe,
    run_probes,
    skipped_probe,
    timed_out,
)
from hallm.platforms.report import PluginReport, auto_choice, plugin_report

__all__ = [
    "DEVICE_ENV",
    "EXTENSION_GROUP",
    "FIRST_PARTY_DEVICES",
    "PLATFORM_GROUP",
    "LoadedPlatform",
    "PlatformChoice",
    "PluginEntry",
    "PluginReport",
    "attention_candidates",
    "auto_choice",
    "contributed_attention_backends",
    "discover",
    "executors",
    "install_hint",
    "kv_connectors",
    "load_extensions",
    "load_platform",
    "models",
    "platform_from_choice",
    "plugin_manager",
    "plugin_report",
    "requested_device",
    "run_probe",
    "select_platform",
]

logger = logging.getLogger("hallm.platforms")

#: Environment variable read when no device is given explicitly.
DEVICE_ENV = "HALLM_DEVICE"


@dataclasses.dataclass(frozen=True)
class PlatformChoice:
    """The selected device: made once in the parent, handed to children as `to_dict()` data."""

    device_id: str
    distribution: str
    version: str
    platform_cls: type[Platform]
    probe: Probe

    def to_dict(self) -> dict[str, Any]:
        """Plain, JSON-serializable data; `from_dict` (in any process) turns it back."""
        return {
            "device_id": self.device_id,
            "distribution": self.distribution,
            "version": self.version,
            "api_version": self.platform_cls.api_version,
            "probe": dataclasses.asdict(self.probe),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> PlatformChoice:
        """Load exactly the chosen plugin, without probing; refuse a different installation.

        A child whose environment has another distribution or version of the plugin than the
        parent would run different code than was chosen, so that is an error, not a warning.
        """
        try:
            device_id, distribution, version = (
                str(data["device_id"]),
                str(data["distribution"]),
                str(data["version"]),
            )
            probe = Probe(**data["probe"])
        except (KeyError, TypeError) as exc:
            raise DeviceSelectionError(f"malformed platform choice {dict(data)!r}: {exc}") from exc
        loaded = load_platform_entry(device_id)
        if (loaded.entry.distribution, loaded.entry.version) != (distribution, version):
            raise DeviceSelectionError(
                f"the parent process chose device '{device_id}' from {distribution} {version}, but this "
                f"process has {loaded.entry.origin}; install the same plugin version in every environment"
            )
        return cls(device_id, distribution, version, loaded.platform_cls, probe)


def platform_from_choice(data: Mapping[str, Any]) -> type[Platform]:
    """In a child process: the Platform class of the parent's `PlatformChoice.to_dict()`."""
    return PlatformChoice.from_dict(data).platform_cls


def requested_device(device: str | None = None) -> str:
    """The device id asked for: `device`, else `$HALLM_DEVICE`, else "auto"."""
    for value in (device, os.environ.get(DEVICE_ENV)):
        if value is not None and value.strip():
            return value.strip()
    return "auto"


def select_platform(device: str | None = None, probe_timeout: float = 10.0) -> PlatformChoice:
    """Resolve the device once: `device`, else `$HALLM_DEVICE`, else "auto".

    An explicit id is authoritative: only that plugin is loaded, and if it is unknown or its
    probe says unavailable this raises `DeviceSelectionError` with the reason and what to do;
    it never falls back to another device. "auto" loads every device plugin (a plugin that
    fails to load is reported, not fatal), probes each in isolation, and picks the available
    one with the highest `auto_priority` (ties: alphabetically first id). A probe that hangs is
    remembered (`HungProbes`) and skipped by later "auto" selections until the device is named
    explicitly. Two distributions claiming one id raise `PluginConflictError` when that id is
    named; "auto" disables that id with a warning and chooses among the others.
    """
    device_id = requested_device(device)
    if device_id == "auto":
        return _select_auto(probe_timeout)
    was_loaded = device_id in loaded_platforms()
    loaded = load_platform_entry(device_id)
    probe = run_probe(loaded.platform_cls, probe_timeout)
    hung = HungProbes.default()
    if timed_out(probe):
        hung.remember(device_id, loaded.entry.distribution, loaded.entry.version)
    elif hung.when(device_id, loaded.entry.distribution, loaded.entry.version) is not None:
        hung.forget(device_id)  # it answered: --device auto probes it again
    if not probe.available:
        if not was_loaded:
            unload_platform(device_id)  # a refused device leaves no trace in the plugin manager
        others = loadable_platforms(exclude=device_id)
        raise DeviceSelectionError(
            f"device '{device_id}' ({loaded.entry.origin}) is installed but not usable here: {probe.reason}. "
            f"hallm does not fall back to another device: fix the cause above, or choose another with "
            f"--device / {DEVICE_ENV} (other installed device plugins that load: {describe_installed(others)})"
        )
    logger.info("device '%s' (%s) selected explicitly: %s", device_id, loaded.entry.origin, probe.reason)
    return PlatformChoice(
        device_id, loaded.entry.distribution, loaded.entry.version, loaded.platform_cls, probe
    )


def _select_auto(probe_timeout: float) -> PlatformChoice:
    installed = discover(PLATFORM_GROUP)
    if not installed:
        raise DeviceSelectionError(
            f"no device plugin is installed; install one, e.g. {install_hint('cpu')} or {install_hint('cuda')}"
        )
    before = set(loaded_platforms())
    loaded: dict[str, LoadedPlatform] = {}
    lines: dict[str, str] = {}
    for device_id, claimants in installed.items():
        if len(claimants) > 1:
            # Only this id is unusable: every other device still works under auto.
            conflict = conflict_message(PLATFORM_GROUP, device_id, claimants)
            lines[device_id] = f"{device_id}: disabled: {conflict}"
            logger.warning("--device auto ignores device id '%s': %s", device_id, conflict)
            continue
        (entry,) = claimants
        try:
            loaded[device_id] = load_entry(entry)
        except HallmError as exc:
            lines[device_id] = f"{device_id} ({entry.origin}): failed to load: {exc}"
            logger.warning("device plugin not loaded: %s", exc)
    hung = HungProbes.default()
    skipped: dict[str, Probe] = {}
    for device_id, lp in loaded.items():
        when = hung.when(device_id, lp.entry.distribution, lp.entry.version)
        if when is not None:
            skipped[device_id] = skipped_probe(device_id, when, probe_timeout)
    probes = run_probes({k: v.platform_cls for k, v in loaded.items() if k not in skipped}, probe_timeout)
    for device_id, probe in probes.items():
        if timed_out(probe):
            entry = loaded[device_id].entry
            hung.remember(device_id, entry.distribution, entry.version)
    probes.update(skipped)
    for device_id, probe in probes.items():
        origin, priority = loaded[device_id].entry.origin, loaded[device_id].platform_cls.auto_priority
        state = f"available, {probe.device_count} device(s)" if probe.available else "unavailable"
        lines[device_id] = f"{device_id} ({origin}, priority {priority}): {state}: {probe.reason}"
    report = "\n".join(f"  {lines[k]}" for k in sorted(lines))
    chosen = choose_auto({k: v.platform_cls.auto_priority for k, v in loaded.items() if probes[k].available})
    # Only the chosen plugin stays registered, as in child processes that load just that one.
    for device_id in set(loaded) - before - {chosen}:
        unload_platform(device_id)
    if chosen is None:
        raise DeviceSelectionError(
            f"--device auto found no usable device:\n{report}\n"
            f"Fix one of the above, or install a device plugin (e.g. {install_hint('cpu')})"
        )
    logger.info("--device auto chose '%s'; probes:\n%s", chosen, report)
    lp = loaded[chosen]
    return PlatformChoice(chosen, lp.entry.distribution, lp.entry.version, lp.platform_cls, probes[chosen])
