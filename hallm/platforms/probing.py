"""Running platform probes in isolation, and ranking the available platforms.

`Platform.probe()` is third-party code that must be cheap and never raise, but the registry
does not trust it to: each probe runs in its own daemon thread with a deadline, so one that
raises is reported as unavailable with its exception, and one that hangs (a wedged driver, a
network mount) is abandoned and reported, never blocking the others or the process's exit.

A probe that hung is remembered (`HungProbes`, a small JSON file in hallm's cache directory,
per distribution and version), so `--device auto` skips it on later starts instead of waiting
for its deadline every time; naming the device explicitly probes it again.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import logging
import os
import threading
import time
from collections.abc import Mapping
from pathlib import Path

from hallm.platforms.paths import cache_root
from hallm.platforms.platform import Platform, Probe

logger = logging.getLogger("hallm.platforms")

#: The reason of a probe abandoned at its deadline starts with this.
TIMEOUT_REASON = "probe did not return within"


class _ProbeThread(threading.Thread):
    def __init__(self, platform_cls: type[Platform]) -> None:
        super().__init__(name=f"hallm-probe-{platform_cls.name}", daemon=True)
        self.platform_cls = platform_cls
        self.result: Probe | None = None

    def run(self) -> None:
        self.result = _guarded_probe(self.platform_cls)


def _guarded_probe(platform_cls: type[Platform]) -> Probe:
    try:
        result: object = platform_cls.probe()
    except BaseException as exc:  # a probe must never take the process down, whatever it raises
        return Probe(False, f"probe raised {type(exc).__name__}: {exc}")
    if not isinstance(result, Probe):
        return Probe(False, f"probe returned {type(result).__name__}, not a hallm.platforms.Probe")
    return result


def run_probes(platforms: Mapping[str, type[Platform]], timeout: float) -> dict[str, Probe]:
    """Probe every platform concurrently; each gets `timeout` seconds from the common start.

    Never raises for a probe's failure: exceptions, hangs and wrong return types become
    `Probe(available=False, reason=...)`. Total wall time is at most about `timeout`.
    """
    threads = {device_id: _ProbeThread(cls) for device_id, cls in platforms.items()}
    for thread in threads.values():
        thread.start()
    deadline = time.monotonic() + timeout
    probes: dict[str, Probe] = {}
    for device_id, thread in threads.items():
        thread.join(max(0.0, deadline - time.monotonic()))
        if thread.is_alive() or thread.result is None:
            # The thread is a daemon: it is left behind and dies with the process.
            probes[device_id] = Probe(False, f"{TIMEOUT_REASON} {timeout:g}s")
        else:
            probes[device_id] = thread.result
    return probes


def run_probe(platform_cls: type[Platform], timeout: float) -> Probe:
    """Probe one platform in isolation (see `run_probes`)."""
    return run_probes({platform_cls.name: platform_cls}, timeout)[platform_cls.name]


def choose_auto(available: Mapping[str, int]) -> str | None:
    """The `--device auto` winner among available device ids with their `auto_priority`.

    Highest priority wins; ties go to the alphabetically first id, so the choice never depends
    on installation or probe order. None when nothing is available.
    """
    if not available:
        return None
    return min(available, key=lambda device_id: (-available[device_id], device_id))


def timed_out(probe: Probe) -> bool:
    """True for the answer `run_probes` gives when a probe missed its deadline."""
    return not probe.available and probe.reason.startswith(TIMEOUT_REASON)


@dataclasses.dataclass
class HungProbes:
    """Probes that hung, remembered across processes: {device id: (distribution, version, when)}.

    An entry holds only for the same distribution and version (an upgrade probes again). The
    file is advisory: unreadable or unwritable, it is ignored, never an error.
    """

    path: Path

    @classmethod
    def default(cls) -> HungProbes:
        """The record in hallm's cache directory (`$HALLM_CACHE_DIR`, else ~/.cache/hallm)."""
        return cls(cache_root() / "hung_probes.json")

    def _read(self) -> dict[str, dict[str, str]]:
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}

    def _write(self, data: dict[str, dict[str, str]]) -> None:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps(data, indent=1), encoding="utf-8")
            tmp.replace(self.path)
        except OSError as exc:
            logger.debug("could not record hung probes in %s: %s", self.path, exc)

    def when(self, device_id: str, distribution: str, version: str) -> str | None:
        """When this device's probe (this distribution and version) hung, or None."""
        entry = self._read().get(device_id)
        if isinstance(entry, dict) and (entry.get("distribution"), entry.get("version")) == (
            distribution,
            version,
        ):
            return str(entry.get("at", "earlier"))
        return None

    def remember(self, device_id: str, distribution: str, version: str) -> None:
        """Record that this device's probe hung (now)."""
        data = self._read()
        at = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        data[device_id] = {"distribution": distribution, "version": version, "at": at}
        self._write(data)

    def forget(self, device_id: str) -> None:
        """Drop this device's record (its probe answered)."""
        data = self._read()
        if data.pop(device_id, None) is not None:
            self._write(data)


def skipped_probe(device_id: str, when: str, timeout: float) -> Probe:
    """What `--device auto` reports for a device whose probe is remembered as hanging."""
    return Probe(
        False,
        f"not probed: its probe hung (no answer within {timeout:g}s) at {when}, so --device auto skips it; "
        f"--device {device_id} probes it again",
    )
