"""`XpuPlatform`: Intel GPUs (Data Center GPU Max, Arc) through PyTorch's XPU runtime, `torch.xpu`.

The probe reads the torch build's XPU version from `torch/version.py` without importing torch
when torch is not loaded yet (any other build is refused right there), then asks `torch.xpu`
whether a device is visible, how many and which.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import TYPE_CHECKING, ClassVar

from hallm.ops.torch_cuda_runtime import torch_build
from hallm.platforms import API_VERSION, Capabilities, Platform, Probe

if TYPE_CHECKING:
    import torch

    from hallm.ops.triton.target import TritonTarget
    from hallm.platforms import AttentionBackend
    from hallm.platforms.ops import OpTable

VISIBLE_ENV = "ZE_AFFINITY_MASK"


def torch_xpu_version() -> str | None:
    """torch.version.xpu (None: not an XPU build). Raises ModuleNotFoundError without torch."""
    return torch_build("xpu")


class XpuPlatform(Platform):
    """Intel GPUs: bf16, fp16, fp32; Triton, IPEX or reference attention; xccl."""

    name: ClassVar[str] = "xpu"
    device_type: ClassVar[str] = "xpu"
    dist_backend: ClassVar[str] = "xccl"
    visible_devices_env: ClassVar[str | None] = VISIBLE_ENV
    ray_resource: ClassVar[str | None] = "GPU"
    auto_priority: ClassVar[int] = 80
    api_version: ClassVar[str] = API_VERSION

    def __init__(self) -> None:
        self._target: TritonTarget | None = None
        self._backends: list[type[AttentionBackend]] | None = None

    @classmethod
    def probe(cls) -> Probe:
        """Available when torch is an XPU build and torch.xpu sees a device."""
        try:
            try:
                xpu = torch_xpu_version()
            except ModuleNotFoundError:
                return Probe(False, "torch is not installed (pip install an XPU build of torch)")
            if xpu is None:
                return Probe(
                    False,
                    "torch is not an XPU build (torch.version.xpu is None): install an XPU build of torch",
                )
            import torch

            if not torch.xpu.is_available():
                mask = os.environ.get(VISIBLE_ENV)
                where = f" ({VISIBLE_ENV}={mask!r})" if mask is not None else ""
                return Probe(False, f"no Intel GPU visible to torch.xpu{where}")
            count = int(torch.xpu.device_count())
            name = torch.xpu.get_device_name(0)
            return Probe(
                True, f"{count} Intel GPU(s) ({name}), torch built for XPU {xpu}", device_count=count
            )
        except Exception as exc:  # a probe never raises
            return Probe(False, f"XPU probe failed: {type(exc).__name__}: {exc}")

    def capabilities(self) -> Capabilities:
        import torch

        return Capabilities(
            dtypes=("bfloat16", "float16", "float32"),
            kv_cache_dtypes=("auto",),
            graph_capture=False,
            max_world_size=max(1, int(torch.xpu.device_count())),
            torch_compile=False,
        )

    def attention_backends(self) -> Sequence[type[AttentionBackend]]:
        """Intel Triton, IPEX, reference: the first whose validate() accepts a layer serves it."""
        from hallm_xpu.attention import backends

        if self._backends is None:
            self._backends = backends(self.triton_target)
        return self._backends

    def triton_target(self) -> TritonTarget:
        """Device 0's Xe cores (what a launch fills); no programmatic dependent launch."""
        if self._target is None:
            import torch

            from hallm.ops.triton.target import GENERIC, TritonTarget

            props = torch.xpu.get_device_properties(0)
            cores = int(getattr(props, "gpu_subslice_count", 0) or GENERIC.num_sms)
            self._target = TritonTarget(num_sms=cores, pdl=False)
        return self._target

    def op_table(self) -> OpTable:
        """hallm's Triton kernels where Intel's Triton backend is installed, else the references."""
        from hallm_xpu.attention import intel_triton_reason

        if intel_triton_reason() is not None:
            return super().op_table()
        from hallm.ops.triton.op_table import triton_op_table

        return triton_op_table(self.triton_target())

    # ---- device runtime -------------------------------------------------------------------

    def device(self, index: int = 0) -> torch.device:
        import torch

        return torch.device("xpu", index)

    def device_name(self, index: int = 0) -> str:
        import torch

        return str(torch.xpu.get_device_name(index))

    def set_device(self, index: int) -> None:
        import torch

        torch.xpu.set_device(index)

    def synchronize(self) -> None:
        import torch

        torch.xpu.synchronize()

    def memory_info(self, device_index: int = 0) -> tuple[int, int]:
        import torch

        free, total = torch.xpu.mem_get_info(device_index)
        return int(free), int(total)

    def empty_cache(self) -> None:
        import torch

        torch.xpu.empty_cache()

    def manual_seed(self, seed: int) -> None:
        import torch

        torch.manual_seed(seed)
        torch.xpu.manual_seed_all(seed)

    def peak_memory_bytes(self) -> int | None:
        import torch

        return int(torch.xpu.max_memory_allocated())

    def allocated_memory_bytes(self) -> int | None:
        import torch

        return int(torch.xpu.memory_allocated())

    def reset_peak_memory(self) -> None:
        import torch

        torch.xpu.reset_peak_memory_stats()
