"""hallm: a hardware-neutral LLM inference engine.

`from hallm import LLM, SamplingParams` is the offline API. Importing `hallm` itself is light:
the engine (and torch) load on first use of those names.
"""

from __future__ import annotations

from typing import Any

from hallm.version import __version__

__all__ = ["LLM", "SamplingParams", "__version__"]


def __getattr__(name: str) -> Any:
    if name == "LLM":
        from hallm.entrypoints.llm import LLM

        return LLM
    if name == "SamplingParams":
        from hallm.core.sampling_params import SamplingParams

        return SamplingParams
    raise AttributeError(f"module 'hallm' has no attribute {name!r}")
