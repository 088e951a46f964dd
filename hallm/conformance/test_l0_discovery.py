"""L0 discovery: the plugin is found, loads, speaks this API, and is safe to import anywhere.

None of these needs the device: they must pass on a machine without it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
import warnings
from typing import Any

import pytest

from hallm.conformance.outcomes import ABORTED_PREFIX
from hallm.conformance.target import Target

pytestmark = [pytest.mark.hallm_level(0), pytest.mark.hallm_group("L0 discovery")]

PROBE_DEADLINE = 10.0  # seconds: "bounded"
PROBE_SLOW = 2.0  # seconds: "cheap"; slower probes pass with a warning


def _loaded(target: Target) -> None:
    """Skip as aborted when the plugin did not load: test_entry_point_resolves reports that once."""
    if not target.loaded:
        pytest.skip(
            f"{ABORTED_PREFIX}device plugin '{target.device_id}' did not load (see test_entry_point_resolves)"
        )


def _import_check(target: Target, mode: str, env: dict[str, str] | None = None) -> dict[str, Any]:
    proc = subprocess.run(
        [sys.executable, "-m", "hallm.conformance.import_check", target.device_id, mode],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, **(env or {})},
        check=False,
    )
    if proc.returncode != 0:
        pytest.fail(f"the import check ({mode}) crashed:\n{proc.stderr[-3000:]}", pytrace=False)
    result: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


def test_entry_point_resolves(target: Target) -> None:
    """Exactly one distribution provides the id; its module imports and registers cleanly."""
    from hallm.platforms.discovery import PLATFORM_GROUP, conflict_message, describe_installed, discover

    installed = discover(PLATFORM_GROUP)
    claimants = installed.get(target.device_id, [])
    if not claimants:
        pytest.fail(
            f"no installed distribution has an entry point '{target.device_id}' in group {PLATFORM_GROUP} "
            f"(installed: {describe_installed(installed)})",
            pytrace=False,
        )
    if len(claimants) > 1:
        pytest.fail(conflict_message(PLATFORM_GROUP, target.device_id, claimants), pytrace=False)
    if not target.loaded:
        pytest.fail(f"device plugin '{target.device_id}' did not load: {target.load_error}", pytrace=False)


def test_api_version_compatible(target: Target) -> None:
    """The plugin targets this core's plugin API: same major, a minor it knows."""
    from hallm.platforms import API_VERSION
    from hallm.platforms.loading import parse_api_version

    _loaded(target)
    assert target.platform_cls is not None
    declared = target.platform_cls.api_version
    major, minor = parse_api_version(declared)
    core_major, core_minor = parse_api_version(API_VERSION)
    if (major, minor) > (core_major, core_minor) or major != core_major:
        pytest.fail(
            f"{target.origin} targets plugin API {declared}; this hallm speaks {API_VERSION} "
            f"(same major, minor <= {core_minor} required)",
            pytrace=False,
        )


def test_hooks_match_specs(target: Target) -> None:
    """Every hallm_* function is a hook implementation that matches its spec (check_pending)."""
    import pluggy

    from hallm.platforms import HallmHookSpecs, Platform
    from hallm.platforms.contributions import contributed_names
    from hallm.platforms.hookspecs import PROJECT_NAME
    from hallm.platforms.loading import platform_plugin_name

    _loaded(target)
    assert target.entry is not None and target.platform_cls is not None
    module: Any = target.entry.load()
    undecorated = [
        n
        for n in dir(module)
        if n.startswith("hallm_")
        and callable(getattr(module, n))
        and not hasattr(getattr(module, n), f"{PROJECT_NAME}_impl")
    ]
    if undecorated:
        pytest.fail(
            f"{target.entry.value}: {undecorated} lack @hallm.platforms.hookimpl, so pluggy ignores them",
            pytrace=False,
        )
    pm = pluggy.PluginManager(PROJECT_NAME)
    pm.add_hookspecs(HallmHookSpecs)
    try:
        pm.register(module, name="under-test")
        pm.check_pending()
    except (ValueError, pluggy.PluginValidationError) as exc:
        pytest.fail(
            f"{target.entry.value}: hook implementations do not match hallm's specs: {exc}", pytrace=False
        )
    result = module.hallm_platform()
    if not (isinstance(result, type) and issubclass(result, Platform)) or result.name != target.device_id:
        pytest.fail(
            f"hallm_platform() returned {result!r}; it must be a Platform subclass named '{target.device_id}'",
            pytrace=False,
        )
    contributed_names(platform_plugin_name(target.device_id))  # raises on malformed contributions


def test_import_loads_no_device_runtime(target: Target) -> None:
    """Importing the entry-point module (what `hallm plugins` does) loads no device runtime."""
    _loaded(target)
    result = _import_check(target, "fresh")
    problems = []
    if result["error"]:
        problems.append(f"importing it raised {result['error']}")
    if result["runtimes"]:
        order = ", ".join(result["new_top_level"][:8])
        problems.append(
            f"it imported device runtime(s) {result['runtimes']} (imported by {', '.join(result['imported_by'])}) "
            f"(new third-party modules, in import order: {order}); import them inside the methods that "
            "need them, never at module level"
        )
    for key, what in (
        ("env_changed", "changed environment variables"),
        ("threads_started", "started threads"),
        ("import_hooks_added", "installed import hooks"),
    ):
        if result[key]:
            problems.append(f"it {what}: {result[key]}")
    if problems:
        pytest.fail(f"importing {result['module']} has side effects: " + "; ".join(problems), pytrace=False)


def test_import_patches_nothing(target: Target) -> None:
    """Importing the plugin and asking it for its platform replaces nothing in torch or hallm."""
    _loaded(target)
    result = _import_check(target, "patch")
    replaced = [f"{k} (at import)" for k in result["import"]] + [
        f"{k} (by hallm_platform()/attention_backends())" for k in result["hook"]
    ]
    if replaced:
        pytest.fail(
            f"{target.origin} monkeypatches: {', '.join(replaced[:8])}; a plugin changes behaviour through "
            "its hooks (hallm.platforms), never by replacing torch's or the core's attributes",
            pytrace=False,
        )


def test_probe_bounded_and_never_raises(target: Target) -> None:
    """probe() returns a Probe within the deadline, says why, and answers the same twice."""
    from hallm.platforms import Probe

    _loaded(target)
    cls = target.platform_cls
    assert cls is not None
    box: dict[str, Any] = {}

    def call() -> None:
        try:
            box["result"] = cls.probe()
        except BaseException as exc:
            box["error"] = exc

    start = time.monotonic()
    thread = threading.Thread(target=call, daemon=True)
    thread.start()
    thread.join(PROBE_DEADLINE)
    took = time.monotonic() - start
    if thread.is_alive():
        pytest.fail(f"probe() did not return within {PROBE_DEADLINE:g} s", pytrace=False)
    if "error" in box:
        pytest.fail(
            f"probe() raised {type(box['error']).__name__}: {box['error']}; it must return Probe(False, reason)",
            pytrace=False,
        )
    probe = box["result"]
    if not isinstance(probe, Probe):
        pytest.fail(f"probe() returned {probe!r}, not a hallm.platforms.Probe", pytrace=False)
    if not isinstance(probe.reason, str) or not probe.reason.strip():
        pytest.fail(
            "probe() gave no reason; say what was found (or what is missing and how to fix it)", pytrace=False
        )
    if not isinstance(probe.device_count, int) or probe.device_count < (1 if probe.available else 0):
        pytest.fail(
            f"probe() says available={probe.available} with device_count={probe.device_count!r}",
            pytrace=False,
        )
    if cls.probe() != probe:
        pytest.fail(
            "probe() answered differently the second time; it must be side-effect free", pytrace=False
        )
    if took > PROBE_SLOW:
        warnings.warn(
            f"probe() took {took:.1f} s; keep it under {PROBE_SLOW:g} s (it runs for every plugin)",
            stacklevel=1,
        )


@pytest.mark.hallm_requires("visible_devices_env")
def test_probe_without_devices(target: Target) -> None:
    """With every device hidden (visible_devices_env=''), the probe says unavailable, with a reason."""
    _loaded(target)
    assert target.platform_cls is not None
    env_var = target.platform_cls.visible_devices_env
    assert env_var
    code = (
        "import json, sys; from hallm.platforms.registry import load_platform, run_probe; "
        f"p = run_probe(load_platform({target.device_id!r}), {PROBE_DEADLINE}); "
        "print(json.dumps([p.available, p.reason, p.device_count]))"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, env_var: ""},
        check=False,
    )
    if proc.returncode != 0:
        pytest.fail(f"probing with {env_var}='' crashed:\n{proc.stderr[-2000:]}", pytrace=False)
    available, reason, count = json.loads(proc.stdout.strip().splitlines()[-1])
    if available or count:
        pytest.fail(
            f"with {env_var}='' (every device hidden) probe() still says available={available}, "
            f"device_count={count}: honour {env_var}, or declare visible_devices_env = None",
            pytrace=False,
        )
    if not reason.strip():
        pytest.fail(f"with {env_var}='' probe() says unavailable without a reason", pytrace=False)


def test_registering_twice_changes_nothing(target: Target) -> None:
    """Loading the plugin again returns the same class and registers nothing new."""
    from hallm.platforms.loading import load_platform, platform_plugin_name, plugin_manager

    _loaded(target)
    pm = plugin_manager()

    def snapshot() -> tuple[Any, ...]:
        names = sorted(n for n, _ in pm.list_name_plugin())
        impls = tuple(
            len(getattr(pm.hook, h).get_hookimpls()) for h in sorted(dir(pm.hook)) if h.startswith("hallm_")
        )
        return tuple(names), impls

    before = snapshot()
    first, second = load_platform(target.device_id), load_platform(target.device_id)
    if not (first is second is target.platform_cls) or snapshot() != before:
        pytest.fail(
            f"loading {target.origin} twice changed the plugin manager: {before} -> {snapshot()}",
            pytrace=False,
        )
    assert pm.get_plugin(platform_plugin_name(target.device_id)) is not None


def test_declarations_are_well_formed(target: Target) -> None:
    """Capabilities and every attention backend's declarations are valid data."""
    from hallm.platforms import DTYPE_NAMES, KNOWN_FEATURES, AttentionBackend, AttentionSpec, Capabilities

    _loaded(target)
    try:
        caps = target.capabilities()
    except Exception as exc:
        if target.available:
            raise
        # Allowed: a platform may read its capabilities from the device it lacks here.
        warnings.warn(
            f"capabilities() needs the device ({type(exc).__name__}: {exc}); checked the backends only",
            stacklevel=1,
        )
        caps = Capabilities(dtypes=DTYPE_NAMES)
    if not isinstance(caps, Capabilities) or "auto" not in caps.kv_cache_dtypes:
        pytest.fail(
            f"capabilities() returned {caps!r}; it must be a Capabilities with 'auto' in kv_cache_dtypes",
            pytrace=False,
        )
    backends = target.backends()
    if not backends:
        pytest.fail(f"{target.origin} has no attention backend", pytrace=False)
    problems = []
    for b in backends:
        if not (
            isinstance(b, type)
            and issubclass(b, AttentionBackend)
            and isinstance(getattr(b, "name", None), str)
        ):
            problems.append(f"{b!r} is not a named AttentionBackend subclass")
            continue
        if not set(b.dtypes) <= set(DTYPE_NAMES):
            problems.append(f"{b.name}.dtypes has unknown names {sorted(set(b.dtypes) - set(DTYPE_NAMES))}")
        if not b.features <= KNOWN_FEATURES:
            problems.append(f"{b.name}.features has unknown names {sorted(b.features - KNOWN_FEATURES)}")
        for dtype in sorted(set(b.dtypes) & set(caps.dtypes)):
            from hallm.conformance.cases import preferred_block_size, preferred_head_size

            spec = AttentionSpec(
                8, 2, preferred_head_size(b), 0.125, dtype, block_size=preferred_block_size(b)
            )
            if b.validate(spec):
                problems.append(
                    f"{b.name}.validate() refuses a configuration it declares: {b.validate(spec)}"
                )
    if not any(caps.dtypes[0] in b.dtypes for b in backends if isinstance(b, type)):
        problems.append(f"no backend serves the platform's default dtype {caps.dtypes[0]}")
    if problems:
        pytest.fail("; ".join(problems), pytrace=False)


def test_declarations_agree(target: Target) -> None:
    """What the platform declares, its backends serve: every dtype, every KV-cache dtype, graphs."""
    from hallm.conformance.cases import preferred_block_size, preferred_head_size
    from hallm.platforms import AttentionSpec, Platform

    _loaded(target)
    assert target.platform_cls is not None
    try:
        caps = target.capabilities()
    except Exception as exc:
        if target.available:
            raise
        pytest.skip(
            f"capabilities() needs the device, which is not available here: {type(exc).__name__}: {exc}"
        )
    backends = target.backends()
    offered = "; ".join(
        f"{b.name} declares dtypes {sorted(b.dtypes)}, KV-cache dtypes {sorted(b.kv_cache_dtypes)}"
        for b in backends
    )
    problems = []
    for dtype in caps.dtypes:
        serving = [
            b
            for b in backends
            if dtype in b.dtypes
            and not b.validate(
                AttentionSpec(8, 2, preferred_head_size(b), 0.125, dtype, block_size=preferred_block_size(b))
            )
        ]
        if not serving:
            problems.append(
                f"Capabilities.dtypes has {dtype}, but no attention backend serves it: a user's --dtype {dtype} "
                "would pass the platform's check and fail only after the model has loaded. Declare it on a "
                "backend, or drop it from Capabilities.dtypes"
            )
    for kv in caps.kv_cache_dtypes:
        if kv != "auto" and not any(kv in b.kv_cache_dtypes for b in backends):
            problems.append(
                f"Capabilities.kv_cache_dtypes has {kv}, but no attention backend declares it in kv_cache_dtypes"
            )
    platform_cls = target.platform_cls
    if caps.graph_capture and platform_cls.step_graphs is Platform.step_graphs:
        problems.append(
            f"Capabilities.graph_capture is True, but {platform_cls.__qualname__} does not override "
            "step_graphs(), so the runner silently runs every step eagerly: implement step_graphs() or "
            "declare graph_capture=False"
        )
    if problems:
        problems.append(f"the backends: {offered}")
        pytest.fail(
            f"{target.origin}: " + "\n  - ".join(["declarations disagree:", *problems]), pytrace=False
        )
