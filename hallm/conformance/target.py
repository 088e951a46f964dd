"""The device under test: its plugin, probe, declarations, and what applies to it.

Tests state what they need as requirement tokens (`hallm_requires` marker); `Target.missing`
turns the first unmet one into a not-applicable or an environment-skip reason:

    available                      env: the probe says the device is usable here
    cpu_reference                  env: the CPU plugin (the L3 reference) is installed
    dtype:D                        the platform's Capabilities.dtypes has D
    kv_cache_dtype:K               the platform's Capabilities.kv_cache_dtypes has K
    feature:F                      some attention backend declares feature F
    backend:B:dtype:D              backend B declares dtype D (and the platform does too)
    backend:B:kv_cache_dtype:K     backend B declares KV-cache dtype K
    backend:B:feature:F            backend B declares feature F
    backend:B:layout:default       backend B keeps the default KV-cache layout
    kv_connector                   the plugin contributes a KV connector
    visible_devices_env            the platform names its visible-devices variable

Capability tokens are checked first: a test is not applicable whatever the environment.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

from hallm.conformance.outcomes import ABORTED_PREFIX, NOT_APPLICABLE_PREFIX

if TYPE_CHECKING:
    from hallm.platforms import AttentionBackend, Capabilities, Platform, Probe
    from hallm.platforms.discovery import PluginEntry

#: Tokens whose absence is the environment's, not the plugin's.
ENV_TOKENS = frozenset({"available", "cpu_reference"})
#: Default KV-cache layout of `AttentionBackend.kv_cache_shape`, probed with small sizes.
_LAYOUT_PROBE = (3, 16, 2, 8)


@dataclasses.dataclass
class Target:
    """One device plugin, loaded (not selected: the kit also runs where the device is absent)."""

    device_id: str
    entry: PluginEntry | None = None
    platform_cls: type[Platform] | None = None
    load_error: str | None = None
    probe: Probe | None = None
    probe_seconds: float = 0.0
    _platform: Platform | None = None
    _backends: list[type[AttentionBackend]] | None = None
    _caps: Capabilities | None = None

    @classmethod
    def load(cls, device_id: str, probe_timeout: float = 10.0) -> Target:
        """Load exactly the plugin `device_id` and probe it; a failure is kept, not raised."""
        from hallm.platforms.loading import load_platform_entry
        from hallm.platforms.probing import run_probe

        target = cls(device_id)
        try:
            loaded = load_platform_entry(device_id)
        except Exception as exc:  # every load failure is the L0 tests' to report
            target.load_error = f"{type(exc).__name__}: {exc}"
            return target
        target.entry, target.platform_cls = loaded.entry, loaded.platform_cls
        start = time.monotonic()
        target.probe = run_probe(loaded.platform_cls, probe_timeout)
        target.probe_seconds = time.monotonic() - start
        return target

    # ---- what the plugin declares -----------------------------------------------------------

    @property
    def loaded(self) -> bool:
        """True when the plugin loaded and passed the registry's checks."""
        return self.platform_cls is not None

    @property
    def available(self) -> bool:
        """True when the probe says the device is usable here."""
        return self.probe is not None and self.probe.available

    @property
    def origin(self) -> str:
        """ "cpu (hallm-cpu 0.1.0)", for messages."""
        return f"{self.device_id} ({self.entry.origin})" if self.entry else f"'{self.device_id}'"

    @property
    def instance(self) -> Platform | None:
        """The platform instance if one was made already (never makes one)."""
        return self._platform

    def platform(self) -> Platform:
        """The platform instance (one per process, bound to device 0 when available)."""
        if self._platform is None:
            if self.platform_cls is None:
                raise RuntimeError(f"device plugin '{self.device_id}' did not load: {self.load_error}")
            self._platform = self.platform_cls()
            if self.available:
                self._platform.set_device(0)
        return self._platform

    def capabilities(self) -> Capabilities:
        """The platform's declared capabilities."""
        if self._caps is None:
            self._caps = self.platform().capabilities()
        return self._caps

    def backends(self) -> list[type[AttentionBackend]]:
        """Every attention backend the engine may select on this device (own, then contributed)."""
        if self._backends is None:
            from hallm.platforms.registry import attention_candidates

            self._backends = attention_candidates(self.platform())
        return self._backends

    def backend(self, name: str) -> type[AttentionBackend]:
        """The backend called `name`."""
        for cls in self.backends():
            if cls.name == name:
                return cls
        raise KeyError(f"no attention backend named {name!r} on {self.origin}")

    def contributions(self, hook_name: str) -> dict[str, type]:
        """What this plugin alone contributes through `hook_name` (a mapping hook), by name."""
        from hallm.platforms.loading import platform_plugin_name, plugin_manager

        own = platform_plugin_name(self.device_id)
        merged: dict[str, type] = {}
        for impl in getattr(plugin_manager().hook, hook_name).get_hookimpls():
            if impl.plugin_name == own:
                answer = impl.function()
                if isinstance(answer, Mapping):
                    merged.update(answer)
        return merged

    # ---- applicability ----------------------------------------------------------------------

    def missing(self, tokens: Iterable[str]) -> str | None:
        """The skip reason (with its outcome prefix) for the first unmet token, or None."""
        tokens = list(tokens)
        if not tokens:
            return None
        if not self.loaded:
            return (
                f"{ABORTED_PREFIX}device plugin '{self.device_id}' did not load, so this cannot run "
                f"(see test_l0_discovery.py::test_entry_point_resolves): {self.load_error}"
            )
        for token in sorted(tokens, key=lambda t: t in ENV_TOKENS):
            try:
                reason = self._unmet(token)
            except Exception:
                if self.available:
                    raise  # declarations must be readable where the device works: a failure
                # Some platforms read their capabilities from the device; without it, that is why.
                return f"device {self.origin} is not available here: {self._reason()}"
            if reason is not None:
                prefix = "" if token in ENV_TOKENS else NOT_APPLICABLE_PREFIX
                return prefix + reason
        return None

    def _unmet(self, token: str) -> str | None:
        kind, _, rest = token.partition(":")
        if kind == "available":
            return None if self.available else f"device {self.origin} is not available here: {self._reason()}"
        if kind == "cpu_reference":
            from hallm.platforms.discovery import PLATFORM_GROUP, discover

            if "cpu" in discover(PLATFORM_GROUP):
                return None
            return "the CPU plugin (the L3 reference) is not installed: pip install 'hallm[cpu]'"
        if kind == "dtype":
            have = self.capabilities().dtypes
            return None if rest in have else f"{self.origin} does not declare dtype {rest} ({_names(have)})"
        if kind == "kv_cache_dtype":
            have = self.capabilities().kv_cache_dtypes
            return (
                None
                if rest in have
                else f"{self.origin} does not declare KV-cache dtype {rest} ({_names(have)})"
            )
        if kind == "feature":
            if any(rest in b.features for b in self.backends()):
                return None
            return f"no attention backend of {self.origin} declares feature {rest}"
        if kind == "backend":
            return self._backend_unmet(rest)
        if kind == "kv_connector":
            if self.contributions("hallm_kv_connectors"):
                return None
            return f"{self.origin} contributes no KV connector (hallm_kv_connectors)"
        if kind == "visible_devices_env":
            if self.platform().visible_devices_env:
                return None
            return f"{self.origin} declares no visible_devices_env"
        raise ValueError(f"unknown requirement token {token!r}")

    def _backend_unmet(self, spec: str) -> str | None:
        name, what, value = [*spec.split(":", 2), "", ""][:3]
        backend = self.backend(name)
        if what == "dtype":
            if value not in self.capabilities().dtypes:
                return f"{self.origin} does not declare dtype {value} ({_names(self.capabilities().dtypes)})"
            ok = value in backend.dtypes
        elif what == "kv_cache_dtype":
            ok = value == "auto" or value in backend.kv_cache_dtypes
        elif what == "feature":
            ok = value in backend.features
        elif what == "layout":
            ok = has_default_layout(backend)
            value = "the default KV-cache layout [2, num_blocks, block_size, num_kv_heads, head_size]"
            if not ok:
                return f"attention backend {name} keeps its own KV-cache layout, not {value}"
        else:
            raise ValueError(f"unknown backend requirement {spec!r}")
        return None if ok else f"attention backend {name} does not declare {what} {value}"

    def _reason(self) -> str:
        return self.probe.reason if self.probe is not None else "not probed"

    # ---- identity, for the report -----------------------------------------------------------

    def device_name(self) -> str:
        """The device's name as the platform reports it (the id where that fails)."""
        if not self.loaded:
            return self.device_id
        try:
            return self.platform().device_name(0) if self.available else f"{self.device_id} (not available)"
        except Exception as exc:
            return f"{self.device_id} (device_name failed: {exc})"

    def describe(self) -> dict[str, Any]:
        """Plain data for the report's header."""
        data: dict[str, Any] = {"device_id": self.device_id, "device_name": self.device_name()}
        if self.entry is not None:
            data["plugin"] = {
                "distribution": self.entry.distribution,
                "version": self.entry.version,
                "module": self.entry.value,
                "api_version": getattr(self.platform_cls, "api_version", None),
            }
        if self.load_error:
            data["load_error"] = self.load_error
        if self.probe is not None:
            data["probe"] = {**dataclasses.asdict(self.probe), "seconds": round(self.probe_seconds, 3)}
        if self.loaded:
            try:
                data["capabilities"] = dataclasses.asdict(self.capabilities())
                data["attention_backends"] = [backend_summary(b) for b in self.backends()]
            except Exception as exc:
                data["declaration_error"] = f"{type(exc).__name__}: {exc}"
        return data


def has_default_layout(backend: type[AttentionBackend]) -> bool:
    """True when `backend.kv_cache_shape` is the default [2, blocks, block_size, kv_heads, head]."""
    nb, bs, hkv, hd = _LAYOUT_PROBE
    return tuple(backend.kv_cache_shape(nb, bs, hkv, hd)) == (2, nb, bs, hkv, hd)


def backend_summary(backend: type[AttentionBackend]) -> dict[str, Any]:
    """What one backend declares, as plain data."""
    return {
        "name": backend.name,
        "class": f"{backend.__module__}.{backend.__qualname__}",
        "dtypes": sorted(backend.dtypes),
        "head_sizes": None if backend.head_sizes is None else sorted(backend.head_sizes),
        "block_sizes": None if backend.block_sizes is None else sorted(backend.block_sizes),
        "block_size_multiple": backend.block_size_multiple,
        "kv_cache_dtypes": sorted(backend.kv_cache_dtypes),
        "features": sorted(backend.features),
    }


def _names(values: Iterable[str]) -> str:
    return "declared: " + (", ".join(values) or "none")
