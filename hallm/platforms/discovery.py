"""Plugin discovery from installed-distribution metadata. Imports no plugin.

Everything here reads `importlib.metadata` (entry points, distribution names and versions) and
nothing else, so listing plugins is safe even when a plugin is broken or its device runtime is
missing. Loading lives in `hallm.platforms.loading`.
"""

from __future__ import annotations

import dataclasses
from importlib import metadata

#: Entry-point group of device plugins: the entry-point NAME is the device id, the VALUE a light
#: module of hook implementations (`hallm_platform` and optionally the contribution hooks).
PLATFORM_GROUP = "hallm.platforms"
#: Entry-point group of extensions that add backends, executors, KV connectors or models.
EXTENSION_GROUP = "hallm.plugins"
#: Device ids whose plugins are published by the hallm project as `hallm[<id>]` extras.
FIRST_PARTY_DEVICES = ("cuda", "rocm", "tpu", "cpu", "neuron", "xpu")


@dataclasses.dataclass(frozen=True)
class PluginEntry:
    """One entry point of an installed distribution, as metadata.

    name: the device id (group `hallm.platforms`) or the extension's name (`hallm.plugins`).
    value: the entry point's target, e.g. "hallm_cpu.plugin".
    """

    group: str
    name: str
    value: str
    distribution: str
    version: str
    entry_point: metadata.EntryPoint = dataclasses.field(compare=False, repr=False)

    @property
    def origin(self) -> str:
        """ "<distribution> <version>", for messages."""
        return f"{self.distribution} {self.version}"

    def load(self) -> object:
        """Import the entry point's target (this is where a plugin's code first runs)."""
        return self.entry_point.load()


def discover(group: str) -> dict[str, list[PluginEntry]]:
    """Entry points of `group` by name; a name with several entries is claimed by several dists.

    Sorted by name, then distribution, so every listing and every choice is deterministic.
    """
    found: dict[str, list[PluginEntry]] = {}
    for ep in metadata.entry_points(group=group):
        dist = ep.dist
        entry = PluginEntry(
            group=group,
            name=ep.name,
            value=ep.value,
            distribution=dist.metadata["Name"] if dist is not None else "<unknown distribution>",
            version=dist.version if dist is not None else "?",
            entry_point=ep,
        )
        claimants = found.setdefault(ep.name, [])
        # A distribution that repeats an entry point is not a conflict with itself.
        if all(c.distribution != entry.distribution for c in claimants):
            claimants.append(entry)
    return {name: sorted(found[name], key=lambda e: e.distribution) for name in sorted(found)}


def conflict_message(group: str, name: str, claimants: list[PluginEntry]) -> str:
    """The error text for a name claimed by more than one distribution."""
    what = f"device id '{name}'" if group == PLATFORM_GROUP else f"extension name '{name}'"
    owners = " and ".join(f"{e.origin} (module {e.value})" for e in claimants)
    return (
        f"{what} (entry-point group {group}) is claimed by {len(claimants)} distributions: {owners}; "
        f"uninstall all but one (pip uninstall {claimants[-1].distribution})"
    )


def install_hint(device_id: str) -> str:
    """How to install the plugin that provides `device_id`."""
    if device_id in FIRST_PARTY_DEVICES:
        return f"pip install 'hallm[{device_id}]'"
    return f"install the vendor's plugin distribution that provides device id '{device_id}'"


def describe_installed(entries: dict[str, list[PluginEntry]]) -> str:
    """'cpu (hallm-cpu 0.1.0), cuda (hallm-cuda 0.1.0)' or 'none', for messages."""
    if not entries:
        return "none"
    return ", ".join(
        f"{name} ({' + '.join(e.origin for e in claimants)})" for name, claimants in entries.items()
    )
