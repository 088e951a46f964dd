"""Side effects of importing a device plugin, measured in a fresh interpreter.

    python -m hallm.conformance.import_check DEVICE_ID fresh   # what importing the module loads
    python -m hallm.conformance.import_check DEVICE_ID patch   # what it (and its hook) replaces

Prints one JSON object. "fresh" snapshots sys.modules, the environment, threads and import
hooks, imports the entry point's module, and reports what is new (device runtimes by name).
"patch" imports torch and the core first, records the identity of every attribute of torch's
main namespaces, of the core's modules and of the contract classes, then imports the plugin,
calls its `hallm_platform()` hook and `attention_backends()`, and reports every attribute that
now points at another object: a plugin overrides behaviour through hooks, never by
monkeypatching the core or torch.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import types
from collections.abc import Iterable
from typing import Any

#: Top-level modules that are device runtimes (or pull one in): never at plugin import time.
RUNTIMES = frozenset(
    {
        "torch",
        "torch_xla",
        "triton",
        "jax",
        "jaxlib",
        "tensorflow",
        "intel_extension_for_pytorch",
        "oneccl_bindings_for_pytorch",
        "torch_npu",
        "torch_mlu",
        "habana_frameworks",
        "torch_neuronx",
        "neuronxcc",
        "libneuronxla",
        "cupy",
        "pycuda",
        "cuda",
        "numba",
        "tensorrt",
        "onnxruntime",
        "openvino",
        "mlx",
        "flash_attn",
        "xformers",
    }
)
#: torch namespaces (and classes) whose attributes a plugin must not replace.
TORCH_WATCH = ("torch", "torch.nn.functional", "torch.nn", "torch.distributed", "torch.cuda", "torch.library")


def _top_levels(names: Iterable[str]) -> list[str]:
    seen: dict[str, None] = {}
    for name in names:
        seen.setdefault(name.partition(".")[0], None)
    return list(seen)


def _importers(names: Iterable[str]) -> list[str]:
    """The modules among `names` whose globals hold a runtime module or one of its objects."""
    found = []
    for name in names:
        module = sys.modules.get(name)
        for value in list(vars(module).values()) if module is not None else []:
            owner = (
                value.__name__ if isinstance(value, types.ModuleType) else getattr(value, "__module__", None)
            )
            if isinstance(owner, str) and owner.partition(".")[0] in RUNTIMES:
                found.append(name)
                break
    return found


def _entry(device_id: str) -> Any:
    from hallm.platforms.discovery import PLATFORM_GROUP, discover

    claimants = discover(PLATFORM_GROUP).get(device_id)
    if not claimants:
        raise SystemExit(json.dumps({"error": f"no installed plugin provides device '{device_id}'"}))
    return claimants[0]


def fresh(device_id: str) -> dict[str, Any]:
    """Import the entry-point module in this (fresh) process and report what changed."""
    entry = _entry(device_id)
    before = dict.fromkeys(sys.modules)
    env = dict(os.environ)
    threads = {t.ident for t in threading.enumerate()}
    meta_path = list(sys.meta_path)
    error = None
    try:
        entry.load()
    except Exception as exc:
        error = f"{type(exc).__name__}: {exc}"
    new = [m for m in sys.modules if m not in before]
    stdlib: frozenset[str] = frozenset(getattr(sys, "stdlib_module_names", ()))
    tops = [t for t in _top_levels(new) if t not in stdlib and not t.startswith("_")]
    runtimes = [t for t in tops if t in RUNTIMES]
    return {
        "module": entry.value,
        "error": error,
        "new_top_level": tops,
        "runtimes": runtimes,
        "imported_by": _importers([m for m in new if m.partition(".")[0] not in RUNTIMES | stdlib]),
        "env_changed": sorted(k for k in set(env) | set(os.environ) if env.get(k) != os.environ.get(k)),
        "threads_started": [t.name for t in threading.enumerate() if t.ident not in threads],
        "import_hooks_added": [repr(h) for h in sys.meta_path if h not in meta_path],
    }


def _identities() -> dict[str, int]:
    ids: dict[str, int] = {}
    spaces: list[tuple[str, Any]] = [(n, sys.modules[n]) for n in TORCH_WATCH if n in sys.modules]
    spaces += [(n, m) for n, m in list(sys.modules.items()) if n == "hallm" or n.startswith("hallm.")]
    torch = sys.modules.get("torch")
    if torch is not None:
        spaces += [("torch.Tensor", torch.Tensor), ("torch.nn.Module", torch.nn.Module)]
    from hallm import platforms

    spaces += [
        (f"hallm.platforms.{c}", getattr(platforms, c))
        for c in ("Platform", "AttentionBackend", "Executor", "KVConnector")
    ]
    for label, space in spaces:
        for key, value in list(vars(space).items()):
            if not key.startswith("__"):
                ids[f"{label}.{key}"] = id(value)
    return ids


def _replaced(before: dict[str, int], after: dict[str, int]) -> list[str]:
    return sorted(k for k, v in before.items() if after.get(k) != v)


def patch(device_id: str) -> dict[str, Any]:
    """Import torch and the core, then the plugin and its hook; report replaced attributes."""
    try:
        import torch
        import torch.nn.functional  # noqa: F401
    except ImportError:
        pass
    import hallm.ops.reference
    import hallm.ops.testing
    import hallm.platforms.registry  # noqa: F401

    entry = _entry(device_id)
    baseline = _identities()
    module = entry.load()
    after_import = _identities()
    result: dict[str, Any] = {"import": _replaced(baseline, after_import), "hook": [], "error": None}
    try:
        platform_cls = module.hallm_platform()
        platform_cls().attention_backends()
    except Exception as exc:
        result["error"] = f"{type(exc).__name__}: {exc}"
    result["hook"] = [k for k in _replaced(baseline, _identities()) if k not in result["import"]]
    return result


def main(argv: list[str]) -> int:
    """`python -m hallm.conformance.import_check DEVICE_ID {fresh|patch}`."""
    device_id, mode = argv
    from hallm.platforms import discovery  # noqa: F401  (baseline: the core's light modules)

    print(json.dumps(fresh(device_id) if mode == "fresh" else patch(device_id)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
