"""Loading plugins: import one entry point, register it with pluggy, check it, validate it.

One process-wide `pluggy.PluginManager("hallm")` holds every loaded plugin: a device plugin
under the name "hallm.platforms:<id>", an extension under "hallm.plugins:<name>". Loading is
idempotent, and a plugin that fails any check is unregistered again, so the manager only ever
holds plugins that passed. Every failure is a `PluginLoadError` naming the plugin and its
distribution; nothing here falls back to anything.
"""

from __future__ import annotations

import dataclasses
import inspect
import logging
import threading

import pluggy

from hallm.platforms import API_VERSION
from hallm.platforms.discovery import (
    EXTENSION_GROUP,
    PLATFORM_GROUP,
    PluginEntry,
    conflict_message,
    describe_installed,
    discover,
    install_hint,
)
from hallm.platforms.errors import (
    DeviceSelectionError,
    HallmError,
    PluginAPIVersionError,
    PluginConflictError,
    PluginLoadError,
)
from hallm.platforms.hookspecs import PROJECT_NAME, HallmHookSpecs
from hallm.platforms.platform import Platform

logger = logging.getLogger("hallm.platforms")

_lock = threading.RLock()  # loading mutates process-wide state; probes run in other threads
_pm: pluggy.PluginManager | None = None
_platforms: dict[str, LoadedPlatform] = {}
_origins: dict[str, str] = {}  # pluggy plugin name -> "platform plugin 'cpu' (hallm-cpu 0.1.0)"
_extension_errors: dict[str, HallmError] | None = None


@dataclasses.dataclass(frozen=True)
class LoadedPlatform:
    """A device plugin that passed every check: where it came from and its Platform class."""

    entry: PluginEntry
    platform_cls: type[Platform]


def plugin_manager() -> pluggy.PluginManager:
    """The process-wide plugin manager (project "hallm", hookspecs `HallmHookSpecs`)."""
    global _pm
    with _lock:
        if _pm is None:
            _pm = pluggy.PluginManager(PROJECT_NAME)
            _pm.add_hookspecs(HallmHookSpecs)
        return _pm


def platform_plugin_name(device_id: str) -> str:
    """The name a device plugin is registered under in the plugin manager."""
    return f"{PLATFORM_GROUP}:{device_id}"


def extension_plugin_name(name: str) -> str:
    """The name an extension is registered under in the plugin manager."""
    return f"{EXTENSION_GROUP}:{name}"


def plugin_origin(plugin_name: str) -> str:
    """Who a registered plugin is, in words, for error messages."""
    return _origins.get(plugin_name, f"plugin '{plugin_name}'")


def parse_api_version(version: str) -> tuple[int, int]:
    """'1.0' -> (1, 0). Raises ValueError for anything but 'MAJOR.MINOR'."""
    major, _, minor = version.partition(".")
    if not (major.isdigit() and minor.isdigit()):
        raise ValueError(f"API version {version!r} is not 'MAJOR.MINOR'")
    return int(major), int(minor)


def unknown_device_message(device_id: str, installed: dict[str, list[PluginEntry]]) -> str:
    """The error text for a device id no installed plugin provides (suggesting only plugins that load)."""
    usable = loadable_platforms(exclude=device_id, installed=installed)
    broken = sorted(set(installed) - set(usable) - {device_id})
    unusable = f"; installed but failing to load or claimed twice: {', '.join(broken)}" if broken else ""
    return (
        f"unknown device '{device_id}': no installed plugin provides it "
        f"(installed device plugins that load: {describe_installed(usable)}{unusable}). "
        f"To use '{device_id}': {install_hint(device_id)}"
    )


def loadable_platforms(
    exclude: str | None = None, installed: dict[str, list[PluginEntry]] | None = None
) -> dict[str, list[PluginEntry]]:
    """The installed device plugins worth suggesting: one distribution each, and they load.

    For error messages: plugins loaded only to check are unregistered again.
    """
    if installed is None:
        installed = discover(PLATFORM_GROUP)
    with _lock:
        before = set(_platforms)
        found: dict[str, list[PluginEntry]] = {}
        for other, claimants in installed.items():
            if other == exclude or len(claimants) > 1:
                continue
            try:
                load_entry(claimants[0])
            except HallmError:
                continue
            found[other] = claimants
            if other not in before:
                unload_platform(other)
        return found


def load_platform_entry(device_id: str) -> LoadedPlatform:
    """Find and load the device plugin `device_id` (and only it); see `load_platform`."""
    with _lock:
        loaded = _platforms.get(device_id)
        if loaded is not None and plugin_manager().get_plugin(platform_plugin_name(device_id)) is not None:
            return loaded  # idempotent, and no metadata scan on the common path
        installed = discover(PLATFORM_GROUP)
        claimants = installed.get(device_id)
        if not claimants:
            raise DeviceSelectionError(unknown_device_message(device_id, installed))
        if len(claimants) > 1:
            raise PluginConflictError(conflict_message(PLATFORM_GROUP, device_id, claimants))
        return load_entry(claimants[0])


def load_entry(entry: PluginEntry) -> LoadedPlatform:
    """Load one discovered device-plugin entry (the caller has ruled out conflicts). Idempotent."""
    pm = plugin_manager()
    name = platform_plugin_name(entry.name)
    with _lock:
        loaded = _platforms.get(entry.name)
        if loaded is not None and pm.get_plugin(name) is not None:
            return loaded  # a second load changes nothing
        label = f"device plugin '{entry.name}' ({entry.origin}, module {entry.value})"
        _register(entry, name, label)
        try:
            platform_cls = _validated_platform(entry, _call_platform_hook(pm, name, label), label)
        except BaseException:
            _unregister(name)
            raise
        loaded = LoadedPlatform(entry, platform_cls)
        _platforms[entry.name] = loaded
        logger.debug("loaded %s: %s", label, platform_cls.__qualname__)
        return loaded


def load_platform(device_id: str) -> type[Platform]:
    """Import and register the device plugin `device_id` only; return its Platform class.

    Idempotent: loading twice returns the same class and registers nothing new. Does not
    probe. Raises `DeviceSelectionError` for an unknown id (the message lists the installed
    ids and the install command), `PluginConflictError` when two distributions claim the id,
    `PluginLoadError` when the module fails to import, implements a hook hallm does not define
    (e.g. a misspelled `hallm_platfrom`), or returns no valid Platform class, and
    `PluginAPIVersionError` when it targets another major version of the plugin API.
    """
    return load_platform_entry(device_id).platform_cls


def unload_platform(device_id: str) -> None:
    """Unregister a loaded device plugin (its module stays imported). No-op if not loaded.

    The registry uses this so that, after `--device auto`, only the chosen plugin answers the
    contribution hooks, exactly as in child processes that load only that plugin.
    """
    with _lock:
        _platforms.pop(device_id, None)
        _unregister(platform_plugin_name(device_id))


def loaded_platforms() -> dict[str, LoadedPlatform]:
    """The device plugins loaded in this process, by device id."""
    with _lock:
        return dict(_platforms)


def load_extensions() -> dict[str, HallmError]:
    """Load every extension (group `hallm.plugins`) once per process; return the failures.

    A failing extension is logged and reported (by name, with its `PluginLoadError` or
    `PluginConflictError`), never fatal: the device and the other extensions still work.
    Later calls return the first call's result without loading anything.
    """
    global _extension_errors
    with _lock:
        if _extension_errors is not None:
            return dict(_extension_errors)
        errors: dict[str, HallmError] = {}
        for ext_name, claimants in discover(EXTENSION_GROUP).items():
            try:
                if len(claimants) > 1:
                    raise PluginConflictError(conflict_message(EXTENSION_GROUP, ext_name, claimants))
                entry = claimants[0]
                _register(entry, extension_plugin_name(ext_name), f"extension '{ext_name}' ({entry.origin})")
            except HallmError as exc:
                logger.warning("extension not loaded: %s", exc)
                errors[ext_name] = exc
        _extension_errors = errors
        return dict(errors)


# ---- internals ------------------------------------------------------------------------------


def _register(entry: PluginEntry, name: str, label: str) -> None:
    """Import `entry`, register it as `name`, and fail loudly on unknown (misspelled) hooks."""
    pm = plugin_manager()
    if pm.get_plugin(name) is not None:
        return
    try:
        plugin = entry.load()
    except Exception as exc:
        raise PluginLoadError(
            f"{label} failed to import: {type(exc).__name__}: {exc} "
            f"(reinstall {entry.distribution}, or remove it: pip uninstall {entry.distribution})"
        ) from exc
    try:
        pm.register(plugin, name=name)
    except (ValueError, pluggy.PluginValidationError) as exc:  # bad hook signature, double registration
        raise PluginLoadError(f"{label} could not be registered: {exc}") from exc
    try:
        pm.check_pending()
    except pluggy.PluginValidationError as exc:
        pm.unregister(name=name)
        known = ", ".join(sorted(n for n in dir(HallmHookSpecs) if n.startswith("hallm_")))
        raise PluginLoadError(
            f"{label} implements a hook hallm does not define: {exc}. Known hooks: {known}"
        ) from exc
    _origins[name] = label


def _unregister(name: str) -> None:
    pm = plugin_manager()
    if pm.get_plugin(name) is not None:
        pm.unregister(name=name)
    _origins.pop(name, None)


def _call_platform_hook(pm: pluggy.PluginManager, name: str, label: str) -> object:
    """Ask this plugin alone for its Platform class (others may be registered too)."""
    impls = [impl for impl in pm.hook.hallm_platform.get_hookimpls() if impl.plugin_name == name]
    if not impls:
        raise PluginLoadError(
            f"{label} does not implement the hallm_platform hook; add "
            "`@hallm.platforms.hookimpl def hallm_platform(): return MyPlatform` to it"
        )
    try:
        return impls[0].function()
    except Exception as exc:
        raise PluginLoadError(f"{label}: hallm_platform() raised {type(exc).__name__}: {exc}") from exc


def _validated_platform(entry: PluginEntry, result: object, label: str) -> type[Platform]:
    if not (isinstance(result, type) and issubclass(result, Platform)):
        raise PluginLoadError(
            f"{label}: hallm_platform() returned {result!r}, not a hallm.platforms.Platform subclass"
        )
    if inspect.isabstract(result):
        missing = ", ".join(sorted(getattr(result, "__abstractmethods__", ())))
        raise PluginLoadError(
            f"{label}: {result.__qualname__} does not implement the required methods {missing}"
        )
    if result.name != entry.name:
        raise PluginLoadError(
            f"{label}: {result.__qualname__}.name is '{result.name}' but the entry-point name (the device id) "
            f"is '{entry.name}'; make them equal"
        )
    core_major, core_minor = parse_api_version(API_VERSION)
    try:
        major, minor = parse_api_version(result.api_version)
    except ValueError as exc:
        raise PluginAPIVersionError(f"{label}: {exc}; set api_version = '{API_VERSION}'") from exc
    if major != core_major:
        raise PluginAPIVersionError(
            f"plugin '{entry.name}' ({entry.origin}) targets hallm plugin API {result.api_version}, "
            f"this hallm speaks {API_VERSION}; install a {entry.distribution} release built for API "
            f"{core_major}.x or upgrade hallm"
        )
    if minor > core_minor:
        logger.warning(
            "plugin '%s' (%s) targets hallm plugin API %s, newer than this hallm's %s; hooks it relies on "
            "may be missing: upgrade hallm",
            entry.name,
            entry.origin,
            result.api_version,
            API_VERSION,
        )
    return result
