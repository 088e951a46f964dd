"""Run in a fresh subprocess over the `mixed_site` fake plugins; prints one JSON document.

The order matters: the explicit selection runs first, in a process that has loaded nothing,
so what it imports and registers is exactly what `--device fakecpu` does.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from collections.abc import Callable
from typing import Any

PLUGIN_MODULES = ("fakecpu_plugin", "fastdev_plugin", "broken_plugin", "raiser_plugin", "fakeext_plugin")


def outcome(fn: Callable[[], Any]) -> dict[str, Any]:
    try:
        return {"ok": True, "value": fn()}
    except Exception as exc:
        return {"ok": False, "type": type(exc).__name__, "message": str(exc), "cause": repr(exc.__cause__)}


def without_distribution(name: str, fn: Callable[..., Any], *args: Any) -> Any:
    """fn(*args) while importlib.metadata lists no entry point of distribution `name`."""
    from importlib import metadata

    real = metadata.entry_points

    def entry_points(**select: Any) -> list[metadata.EntryPoint]:
        return [ep for ep in real(**select) if ep.dist is None or ep.dist.metadata["Name"] != name]

    metadata.entry_points = entry_points  # type: ignore[assignment]
    try:
        return fn(*args)
    finally:
        metadata.entry_points = real


def modules(*names: str) -> dict[str, bool]:
    return {name: name in sys.modules for name in names}


def main() -> None:
    results: dict[str, Any] = {}
    records: list[str] = []  # messages of logger "hallm.platforms"
    handler = logging.Handler()
    handler.emit = lambda record: records.append(record.getMessage())  # type: ignore[method-assign]
    logging.getLogger("hallm.platforms").addHandler(handler)
    logging.getLogger("hallm.platforms").setLevel(logging.INFO)
    import hallm
    import hallm.platforms

    results["modules_after_import"] = modules("torch", "fake_device_runtime", *PLUGIN_MODULES)
    del hallm

    from hallm.platforms import registry

    pm = registry.plugin_manager()

    def registered() -> list[str]:
        return sorted(name for name, _ in pm.list_name_plugin())

    choice = registry.select_platform("fakecpu", probe_timeout=5)
    results["explicit"] = {
        "device": choice.device_id,
        "distribution": choice.distribution,
        "version": choice.version,
        "probe": choice.probe.reason,
        "registered": registered(),
        "modules": modules(*PLUGIN_MODULES),
    }

    count = len(pm.get_plugins())
    first, second = registry.load_platform("fakecpu"), registry.load_platform("fakecpu")
    results["twice"] = {
        "same_class": first is second is choice.platform_cls,
        "count_before": count,
        "count_after": len(pm.get_plugins()),
    }

    # hallm-rocm is installed in the dev environment: hide its distribution to see what a user
    # without it is told.
    results["unknown_first_party"] = outcome(
        lambda: without_distribution("hallm-rocm", registry.select_platform, "rocm")
    )
    results["unknown_vendor"] = outcome(lambda: registry.select_platform("acme9"))
    results["unavailable"] = outcome(lambda: registry.select_platform("offdev"))
    results["broken"] = outcome(lambda: registry.select_platform("broken"))
    results["future"] = outcome(lambda: registry.load_platform("future"))
    results["typo"] = outcome(lambda: registry.load_platform("typo"))
    results["wrongname"] = outcome(lambda: registry.load_platform("wrongname"))
    seen = len(records)
    results["newer"] = outcome(lambda: registry.load_platform("newer").name)
    results["newer"]["warnings"] = records[seen:]
    results["registered_after_errors"] = registered()

    os.environ["HALLM_DEVICE"] = "fakecpu"
    results["env"] = outcome(lambda: registry.select_platform().device_id)
    results["env_overridden"] = outcome(lambda: registry.select_platform("fastdev").device_id)
    os.environ["HALLM_DEVICE"] = "offdev"
    results["env_unavailable"] = outcome(lambda: registry.select_platform())
    del os.environ["HALLM_DEVICE"]

    del records[:]
    start = time.monotonic()
    auto = outcome(lambda: registry.select_platform("auto", probe_timeout=1).device_id)
    results["auto"] = {
        **auto,
        "seconds": time.monotonic() - start,
        "log": records[:],
        "registered": registered(),
    }

    # The hanger's probe is remembered: a second auto start does not wait for it again.
    del records[:]
    start = time.monotonic()
    again = outcome(lambda: registry.select_platform("auto", probe_timeout=1).device_id)
    results["auto_again"] = {**again, "seconds": time.monotonic() - start, "log": records[:]}
    results["hanger_explicit"] = outcome(lambda: registry.select_platform("hanger", probe_timeout=0.2))

    results["choice"] = choice.to_dict()

    platform = choice.platform_cls()
    results["contributions"] = {
        "attention": [cls.name for cls in registry.attention_candidates(platform)],
        "executors": sorted(registry.executors()),
        "extension_errors": {k: [type(v).__name__, str(v)] for k, v in registry.load_extensions().items()},
        "registered": registered(),
    }
    results["modules_at_end"] = modules("fake_device_runtime")
    print(json.dumps(results))


if __name__ == "__main__":
    main()
