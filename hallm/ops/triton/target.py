"""What a Triton launch needs to know of the device it runs on.

The plugin that launches hallm's Triton kernels describes its device once (`TritonTarget`) and
passes it in; the launch parameters follow from it, never from a runtime query:
- `num_sms` (streaming multiprocessors on NVIDIA, compute units on AMD) sizes the skinny GEMM's
  K split and the number of split-KV segments a small decode batch uses;
- `warp_size` (32 on NVIDIA, a 64-wide wavefront on AMD's CDNA GPUs) turns a tuned number of
  threads per program into Triton's `num_warps`, so a program has the same threads, and each
  thread the same share of a tile, on both;
- `shared_memory_bytes` is what one program may allocate (the compile checks hold every variant
  to it);
- `pdl` turns on programmatic dependent launch, which only the CUDA backend has: a HIP target
  with it is refused at construction.
Nothing here asks a device runtime: hallm-cuda and hallm-rocm pass their own facts, and the
interpreter and the compile checks run with `GENERIC` or `amd_target(...)`.
"""

from __future__ import annotations

import dataclasses

#: Triton backends hallm's kernels are launched and compile-checked for.
BACKENDS = ("cuda", "hip")
#: The number of SMs the launch constants were tuned at (an H100/H200, benchmarks/results/gpu.md).
TUNED_SMS = 132
#: AMD architectures hallm's kernels are compile-checked for: wavefront width and the local data
#: share (LDS) one workgroup may use (gfx90a: MI200, gfx942: MI300).
AMD_ARCHS: dict[str, tuple[int, int]] = {"gfx90a": (64, 64 * 1024), "gfx942": (64, 64 * 1024)}
#: Dynamic shared memory one block may use on the smallest NVIDIA target supported (sm_86/89).
NVIDIA_SHARED_MEMORY = 99 * 1024


@dataclasses.dataclass(frozen=True)
class TritonTarget:
    """The device a launch fills; see the module doc for each field."""

    num_sms: int
    pdl: bool = False
    backend: str = "cuda"
    warp_size: int = 32
    shared_memory_bytes: int = NVIDIA_SHARED_MEMORY

    def __post_init__(self) -> None:
        if self.num_sms < 1:
            raise ValueError(f"TritonTarget.num_sms must be >= 1, got {self.num_sms}")
        if self.backend not in BACKENDS:
            raise ValueError(f"TritonTarget.backend must be one of {BACKENDS}, got {self.backend!r}")
        if self.warp_size not in (32, 64):
            raise ValueError(f"TritonTarget.warp_size must be 32 or 64, got {self.warp_size}")
        if self.pdl and self.backend != "cuda":
            raise ValueError("programmatic dependent launch is a CUDA feature; a HIP target cannot use it")
        if self.shared_memory_bytes < 16 * 1024:
            raise ValueError(f"TritonTarget.shared_memory_bytes is too small: {self.shared_memory_bytes}")

    def warps(self, threads: int) -> int:
        """Triton's `num_warps` for `threads` threads per program (at least one warp)."""
        return max(1, threads // self.warp_size)

    def scaled(self, count: int) -> int:
        """A program count tuned on a TUNED_SMS-SM GPU, scaled to this target's size."""
        return max(1, count * self.num_sms // TUNED_SMS)


def amd_target(arch: str, num_cus: int) -> TritonTarget:
    """The target of an AMD GPU of architecture `arch` (e.g. "gfx942") with `num_cus` CUs."""
    if arch not in AMD_ARCHS:
        raise ValueError(f"no Triton target for AMD architecture {arch!r}; known: {', '.join(AMD_ARCHS)}")
    wave, lds = AMD_ARCHS[arch]
    return TritonTarget(num_sms=num_cus, backend="hip", warp_size=wave, shared_memory_bytes=lds)


#: The target of launches that name none: the interpreter, compile checks, and direct calls.
#: Its size is a large datacenter GPU's; it changes launch shapes only, never results.
GENERIC = TritonTarget(num_sms=TUNED_SMS, pdl=False)


def warps_for(target: TritonTarget | None, threads: int) -> int:
    """`num_warps` for `threads` threads per program on `target` (None: `GENERIC`)."""
    return (target or GENERIC).warps(threads)
