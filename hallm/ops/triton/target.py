"""What a Triton launch needs to know of the device it runs on.

The plugin that launches hallm's Triton kernels describes its device once (`TritonTarget`) and
passes it in: the number of compute units sizes the skinny GEMM's K split, and `pdl` turns on
programmatic dependent launch where the device and the compiled kernels have it. Nothing here
asks a device runtime: a ROCm or XPU plugin passes its own facts, and the interpreter and the
compile checks run with `GENERIC`.
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class TritonTarget:
    """num_sms: streaming multiprocessors (CUDA) or compute units (ROCm) a launch can fill.
    pdl: launch with programmatic dependent launch (CUDA sm_90 and later)."""

    num_sms: int
    pdl: bool = False

    def __post_init__(self) -> None:
        if self.num_sms < 1:
            raise ValueError(f"TritonTarget.num_sms must be >= 1, got {self.num_sms}")


#: The target of launches that name none: the interpreter, compile checks, and direct calls.
#: Its size is a large datacenter GPU's; it changes launch shapes only, never results.
GENERIC = TritonTarget(num_sms=132, pdl=False)
