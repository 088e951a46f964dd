"""Running platform probes in isolation, and ranking the available platforms.

`Platform.probe()` is third-party code that must be cheap and never raise, but the registry
does not trust it to: each probe runs in its own daemon thread with a deadline, so one that
raises is reported as unavailable with its exception, and one that hangs (a wedged driver, a
network mount) is abandoned and reported, never blocking the others or the process's exit.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Mapping

from hallm.platforms.platform import Platform, Probe


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
            probes[device_id] = Probe(False, f"probe did not return within {timeout:g}s")
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
