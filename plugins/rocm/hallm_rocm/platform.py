"""`RocmPlatform`: AMD GPUs through a ROCm build of PyTorch, where `torch.cuda` is HIP.

The probe is cheap and leaves HIP uninitialized in the calling process: it reads the torch
build's HIP version from `torch/version.py` without importing torch when torch is not loaded yet
(a CUDA or CPU-only build is refused right there), looks for the AMD kernel driver's device node
(/dev/kfd) without opening it, and counts devices with `torch.cuda.device_count()`, which
creates no context. It never claims an NVIDIA GPU: a CUDA build of torch is hallm-cuda's.

Everything that runs on the device is shared with hallm-cuda through `hallm.ops`: the portable
Triton kernels (attention, the op table) launched for this GPU's `TritonTarget`, the decode
graph runner (HIP graphs through torch.cuda's graph API) and the torch.cuda runtime calls.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from hallm.ops.torch_cuda_runtime import TorchCudaRuntime, torch_build_versions
from hallm.platforms import API_VERSION, Capabilities, Platform, Probe

if TYPE_CHECKING:
    from hallm.ops.triton.target import TritonTarget
    from hallm.platforms import AttentionBackend
    from hallm.platforms.graphs import StepGraphRunner, StepGraphTarget
    from hallm.platforms.ops import OpTable

#: The architectures hallm's Triton kernels are compile-checked for in CI (gfx90a: MI200,
#: gfx942: MI300), with their dtypes, default first. Others are refused by update_config.
ARCH_DTYPES: dict[str, tuple[str, ...]] = {
    "gfx90a": ("bfloat16", "float16", "float32"),
    "gfx942": ("bfloat16", "float16", "float32"),
}
#: The AMD kernel driver's compute device node (amdgpu's KFD), which every ROCm process opens.
KFD_PATH = Path("/dev/kfd")
#: The device runtime's own device selections, most specific first (HIP, then the ROCr runtime).
VISIBLE_ENVS = ("HIP_VISIBLE_DEVICES", "ROCR_VISIBLE_DEVICES", "CUDA_VISIBLE_DEVICES")


def driver_present() -> bool:
    """Whether the AMD GPU kernel driver is loaded (its device node exists; nothing is opened)."""
    return KFD_PATH.exists()


def device_count() -> int:
    """Visible AMD GPUs per torch's HIP runtime (creates no context)."""
    import torch

    return int(torch.cuda.device_count())


def visible_devices() -> str:
    """The device selections set in the environment, e.g. " (HIP_VISIBLE_DEVICES='')", or ""."""
    set_ = [f"{name}={os.environ[name]!r}" for name in VISIBLE_ENVS if name in os.environ]
    return f" ({', '.join(set_)})" if set_ else ""


class RocmPlatform(TorchCudaRuntime, Platform):
    """AMD Instinct GPUs (gfx90a, gfx942): bf16, fp16, fp32; Triton paged attention; HIP graphs
    for decode; RCCL through torch's nccl backend."""

    name: ClassVar[str] = "rocm"
    device_type: ClassVar[str] = "cuda"  # torch's device type on a ROCm build
    dist_backend: ClassVar[str] = "nccl"  # RCCL answers to the nccl backend on a ROCm build
    visible_devices_env: ClassVar[str | None] = "HIP_VISIBLE_DEVICES"
    ray_resource: ClassVar[str | None] = "GPU"
    auto_priority: ClassVar[int] = 100
    api_version: ClassVar[str] = API_VERSION

    def __init__(self) -> None:
        self._target: TritonTarget | None = None
        self._backends: list[type[AttentionBackend]] | None = None

    @classmethod
    def probe(cls) -> Probe:
        """Available when torch is a ROCm build, the AMD driver is loaded and a GPU is visible."""
        try:
            try:
                cuda, hip = torch_build_versions()
            except ModuleNotFoundError:
                return Probe(False, "torch is not installed (pip install a ROCm build of torch)")
            if hip is None and cuda is not None:
                return Probe(
                    False,
                    f"torch is a CUDA build (CUDA {cuda}), not ROCm: install a ROCm build of torch, "
                    "or use --device cuda for NVIDIA GPUs",
                )
            if hip is None:
                return Probe(
                    False, "CPU-only torch build (torch.version.hip is None): install a ROCm build of torch"
                )
            if not driver_present():
                return Probe(False, f"no AMD GPU driver ({KFD_PATH} not found; torch is built for HIP {hip})")
            count = device_count()
            if count == 0:
                return Probe(False, f"no AMD GPU visible{visible_devices()}")
            return Probe(True, f"{count} AMD GPU(s), torch built for HIP {hip}", device_count=count)
        except Exception as exc:  # a probe never raises
            return Probe(False, f"ROCm probe failed: {type(exc).__name__}: {exc}")

    # ---- capabilities ---------------------------------------------------------------------

    def arch(self, index: int = 0) -> str:
        """The GPU's gfx architecture, e.g. "gfx942" (without feature flags like ":xnack-")."""
        import torch

        name = str(getattr(torch.cuda.get_device_properties(index), "gcnArchName", ""))
        return name.split(":")[0]

    def capabilities(self) -> Capabilities:
        """dtypes by architecture (fp16/fp32 for one outside ARCH_DTYPES, which update_config
        refuses); graphs; TP over RCCL."""
        return Capabilities(
            dtypes=ARCH_DTYPES.get(self.arch(0), ("float16", "float32")),
            kv_cache_dtypes=("auto",),
            graph_capture=True,
            max_world_size=max(1, device_count()),
            torch_compile=False,
            pinned_host_memory=True,  # page-locked host buffers copy by DMA, asynchronously
        )

    def attention_backends(self) -> Sequence[type[AttentionBackend]]:
        """The Triton backend (hallm.ops.triton), launching for this GPU (asked when a layer's
        backend is made: listing backends initializes no HIP)."""
        from hallm.ops.triton.backend import TritonPagedAttention

        if self._backends is None:  # one class per platform: the runner shares metadata per class
            self._backends = [TritonPagedAttention.for_target(self.triton_target)]
        return self._backends

    def update_config(self, config: Any) -> None:
        from hallm.platforms import ConfigError

        arch = self.arch(0)
        if arch not in ARCH_DTYPES:
            raise ConfigError(
                f"AMD GPU architecture {arch or 'unknown'!r} is not one hallm's Triton kernels are "
                f"checked for ({', '.join(ARCH_DTYPES)}); use --device cpu"
            )

    def device_name(self, index: int = 0) -> str:
        import torch

        return f"{torch.cuda.get_device_name(index)} ({self.arch(index)})"

    # ---- engine hooks -----------------------------------------------------------------------

    def triton_target(self) -> TritonTarget:
        """Device 0 as a Triton target: its compute units, the architecture's 64-wide wavefront
        and 64 KiB of LDS (`hallm.ops.triton.target.amd_target`); no programmatic dependent
        launch, a CUDA feature that a HIP target refuses by construction."""
        if self._target is None:
            import torch

            from hallm.ops.triton.target import amd_target

            cus = int(torch.cuda.get_device_properties(0).multi_processor_count)
            self._target = amd_target(self.arch(0), cus)
        return self._target

    def op_table(self) -> OpTable:
        """hallm's Triton kernels for the layers' ops (`hallm.ops.triton.op_table`)."""
        from hallm.ops.triton.op_table import triton_op_table

        return triton_op_table(self.triton_target())

    def warm_up_at_start(self) -> bool:
        """True: the Triton kernels compile on first use, per shape specialisation; the engine's
        start-up warm-up builds them before the first user request does."""
        return True

    def step_graphs(self, target: StepGraphTarget) -> StepGraphRunner | None:
        """HIP graphs of decode steps for padded batch sizes (`hallm.ops.torch_graphs`)."""
        from hallm.ops.torch_graphs import capture_decode_graphs

        return capture_decode_graphs(target)
