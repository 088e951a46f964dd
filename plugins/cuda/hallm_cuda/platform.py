"""`CudaPlatform`: NVIDIA GPUs through PyTorch's CUDA runtime (its `torch.cuda` calls are
`hallm.ops.torch_cuda_runtime.TorchCudaRuntime`, shared with hallm-rocm).

The probe is cheap and leaves CUDA uninitialized in the calling process: it reads the torch
build's CUDA version from `torch/version.py` without importing torch when torch is not loaded
yet (a CPU-only build is refused right there), looks for the driver library without calling
into it, and counts devices with `torch.cuda.device_count()`, which creates no context and
leaves `torch.cuda.is_initialized()` False (so forked workers can still use CUDA).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, ClassVar

from hallm.ops.torch_cuda_runtime import TorchCudaRuntime, torch_build_versions
from hallm.platforms import API_VERSION, Capabilities, Platform, Probe

if TYPE_CHECKING:
    from hallm.ops.triton.target import TritonTarget
    from hallm.platforms import AttentionBackend
    from hallm.platforms.graphs import StepGraphRunner, StepGraphTarget
    from hallm.platforms.ops import OpTable

#: Compute capability from which bf16 is supported (Ampere).
BF16_MIN_CAPABILITY = (8, 0)
#: Oldest GPU Triton compiles for.
MIN_CAPABILITY = (7, 5)
#: Compute capability from which kernels launch with programmatic dependent launch (Hopper).
PDL_MIN_CAPABILITY = (9, 0)

#: (torch.version.cuda, torch.version.hip), read without importing torch.
torch_cuda_version = torch_build_versions


def driver_library() -> str | None:
    """The NVIDIA driver library's name if it can be loaded (nothing in it is called), else None."""
    for name in ("libcuda.so.1", ctypes.util.find_library("cuda"), "nvcuda.dll"):
        if not name:
            continue
        try:
            ctypes.CDLL(name)
        except OSError:
            continue
        return name
    return None


def visible_devices() -> str | None:
    return os.environ.get("CUDA_VISIBLE_DEVICES")


def device_count() -> int:
    """Visible CUDA devices per torch (creates no CUDA context)."""
    import torch

    return int(torch.cuda.device_count())


class CudaPlatform(TorchCudaRuntime, Platform):
    """NVIDIA GPUs: bf16 (sm_80+), fp16, fp32; Triton paged attention; CUDA graphs of steps."""

    name: ClassVar[str] = "cuda"
    device_type: ClassVar[str] = "cuda"
    dist_backend: ClassVar[str] = "nccl"
    visible_devices_env: ClassVar[str | None] = "CUDA_VISIBLE_DEVICES"
    ray_resource: ClassVar[str | None] = "GPU"
    auto_priority: ClassVar[int] = 100
    # Released together with the core (hallm-cuda pins hallm<0.2), so it speaks the core's API.
    api_version: ClassVar[str] = API_VERSION

    def __init__(self) -> None:
        self._target: TritonTarget | None = None
        self._backends: list[type[AttentionBackend]] | None = None

    @classmethod
    def probe(cls) -> Probe:
        """Available when torch is a CUDA build, the driver is there and a device is visible."""
        try:
            try:
                cuda, hip = torch_cuda_version()
            except ModuleNotFoundError:
                return Probe(False, "torch is not installed (pip install torch)")
            if hip is not None:
                return Probe(False, f"torch is a ROCm build (HIP {hip}); use --device rocm")
            if cuda is None:
                return Probe(
                    False,
                    "CPU-only torch build (torch.version.cuda is None): install a CUDA build of torch",
                )
            if driver_library() is None:
                return Probe(
                    False, f"no NVIDIA driver (libcuda.so.1 not found; torch is built for CUDA {cuda})"
                )
            count = device_count()
            if count == 0:
                env = visible_devices()
                where = f" (CUDA_VISIBLE_DEVICES={env!r})" if env is not None else ""
                return Probe(False, f"no device visible{where}")
            return Probe(True, f"{count} NVIDIA GPU(s), torch built for CUDA {cuda}", device_count=count)
        except Exception as exc:  # a probe never raises
            return Probe(False, f"CUDA probe failed: {type(exc).__name__}: {exc}")

    # ---- capabilities ---------------------------------------------------------------------

    def compute_capability(self, index: int = 0) -> tuple[int, int]:
        import torch

        major, minor = torch.cuda.get_device_capability(index)
        return int(major), int(minor)

    def capabilities(self) -> Capabilities:
        """bf16 first (default) from sm_80, else fp16; fp32 always; graphs; TP over NCCL."""
        cap = self.compute_capability(0)
        if cap >= BF16_MIN_CAPABILITY:
            dtypes: tuple[str, ...] = ("bfloat16", "float16", "float32")
        else:
            dtypes = ("float16", "float32")
        return Capabilities(
            dtypes=dtypes,
            kv_cache_dtypes=("auto",),
            graph_capture=True,
            max_world_size=max(1, device_count()),
            torch_compile=False,
            pinned_host_memory=True,  # page-locked host buffers copy by DMA, asynchronously
        )

    def attention_backends(self) -> Sequence[type[AttentionBackend]]:
        """The Triton backend (hallm.ops.triton), launching for this GPU (asked when a layer's
        backend is made: listing backends initializes no CUDA)."""
        from hallm_cuda.attention import backends

        if self._backends is None:  # one class per platform: the runner shares metadata per class
            self._backends = backends(self.triton_target)
        return self._backends

    def default_max_num_batched_tokens(self, max_model_len: int) -> int:
        """8192 tokens a step whatever the context length: a prompt step past the largest graph
        (2,048 tokens) runs eagerly, a Triton or cuBLAS launch per op per layer, so its host time
        is large and mostly fixed; with small steps the GPU waits for the host (the measured budgets: benchmarks/gpu_step_budget.py,
        benchmarks/results/gpu.md)."""
        return 8192

    def update_config(self, config: Any) -> None:
        from hallm.platforms import ConfigError

        cap = self.compute_capability(0)
        if cap < MIN_CAPABILITY:
            raise ConfigError(
                f"GPU compute capability {cap[0]}.{cap[1]} is below {MIN_CAPABILITY[0]}.{MIN_CAPABILITY[1]}, "
                "the oldest Triton supports; use --device cpu"
            )

    # ---- device runtime -------------------------------------------------------------------

    def device_name(self, index: int = 0) -> str:
        import torch

        major, minor = self.compute_capability(index)
        return f"{torch.cuda.get_device_name(index)} (sm_{major}{minor})"

    # ---- engine hooks -----------------------------------------------------------------------

    def triton_target(self) -> TritonTarget:
        """Device 0's SM count, the shared memory a block may opt in to (what pipelined kernels
        size their stages from), and programmatic dependent launch from sm_90 on."""
        if self._target is None:
            import torch

            from hallm.ops.triton.target import NVIDIA_SHARED_MEMORY, TritonTarget

            props = torch.cuda.get_device_properties(0)
            shared = int(getattr(props, "shared_memory_per_block_optin", 0)) or NVIDIA_SHARED_MEMORY
            self._target = TritonTarget(
                num_sms=int(props.multi_processor_count),
                pdl=self.compute_capability(0) >= PDL_MIN_CAPABILITY,
                shared_memory_bytes=shared,
            )
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
        """CUDA graphs of decode steps by padded batch size, and of steps with prompt tokens by
        padded token count up to 2,048 (see `hallm.ops.torch_graphs`).

        A prompt step run eagerly is host-bound on small models (one launch per op and layer), so
        graphing it shortens a lone request's time to first token; saturated prompt steps are
        past the largest graph and run eagerly either way. The A/B is benchmarks/variants.py
        `decode-graphs`; its numbers are in benchmarks/results/gpu.md."""
        from hallm.ops.torch_graphs import capture_step_graphs, mixed_capture_sizes

        return capture_step_graphs(target, mixed_sizes=mixed_capture_sizes(target.max_num_tokens))
