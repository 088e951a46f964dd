"""hallm's user settings in the environment: every HALLM_* variable hallm reads, declared here.

Each is a documented setting (listed in the README), never an experiment switch. Code reads them
through these names, and a switch through `env_flag`, which refuses a value it would misread:
"false" or "off" must not silently mean the opposite of what its writer meant.
"""

from __future__ import annotations

import os

#: The device id to use when none is given (`--device`); else "auto".
DEVICE = "HALLM_DEVICE"
#: The bearer token `hallm serve` requires on /v1 routes (and `hallm bench serve` sends).
API_KEY = "HALLM_API_KEY"
#: Where hallm keeps what it derives at run time (converted GGUF models, compiled kernels).
CACHE_DIR = "HALLM_CACHE_DIR"
#: 0 keeps the CPU plugin on its pure-torch paths (its C kernels are not built or loaded).
CPU_NATIVE = "HALLM_CPU_NATIVE"

#: Every setting with its one-line meaning (the README lists the same).
SETTINGS: dict[str, str] = {
    DEVICE: "device id used when --device is not given (default: auto)",
    API_KEY: "bearer token `hallm serve` requires on /v1 routes (default: none)",
    CACHE_DIR: "cache of converted GGUF models and compiled kernels (default: ~/.cache/hallm)",
    CPU_NATIVE: "0 keeps the CPU plugin on its pure-torch paths (default: 1, native C kernels)",
}

_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"0", "false", "no", "off"})


def env_flag(name: str, default: bool) -> bool:
    """The switch `name`: unset or empty gives `default`; 1/true/yes/on and 0/false/no/off (any
    case) give True and False; anything else raises ValueError."""
    if name not in SETTINGS:
        raise KeyError(f"{name} is not a hallm setting; declare it in hallm.platforms.env")
    raw = os.environ.get(name, "").strip().lower()
    if not raw:
        return default
    if raw in _TRUE:
        return True
    if raw in _FALSE:
        return False
    raise ValueError(
        f"{name}={os.environ[name]!r} is not a switch: set it to 1 (or true/yes/on) or 0 "
        f"(or false/no/off), or unset it for the default ({int(default)})"
    )
