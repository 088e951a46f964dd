"""Read hallm's tuning switches from the environment, refusing values that would be misread.

The kernels and plugins take a few HALLM_* variables for A/B runs (HALLM_TRITON_PDL=0,
HALLM_CUDA_FUSED_DECODER=0, ...). A value such as "false" or "off" must not silently mean the
opposite of what its writer meant, so every switch goes through `env_flag` and every count
through `env_int`, which raise a ValueError that names the variable and the values it takes.
They read the environment at each call (tests and benchmarks set it per case).
"""

from __future__ import annotations

import os

_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"0", "false", "no", "off"})


def env_flag(name: str, default: bool) -> bool:
    """The switch `name`: unset or empty gives `default`; 1/true/yes/on and 0/false/no/off (any
    case) give True and False; anything else raises ValueError."""
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


def env_int(name: str, default: int, minimum: int = 0) -> int:
    """The count `name`: unset or empty gives `default`; an integer >= `minimum`, else ValueError."""
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        value = minimum - 1
    if value < minimum:
        raise ValueError(
            f"{name}={os.environ[name]!r} must be an integer >= {minimum}, or unset for the "
            f"default ({default})"
        )
    return value
