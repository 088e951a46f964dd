"""`CpuPlatform`: the host CPU as a hallm device.

Always available, lowest auto priority (any accelerator wins `--device auto`), tensor parallelism
over gloo. Imports no torch at import time: the probe must stay cheap.
"""

from __future__ import annotations

import os
import platform as _host
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

import psutil  # type: ignore[import-untyped]

from hallm.platforms import API_VERSION, Capabilities, Platform, Probe

if TYPE_CHECKING:
    from hallm.platforms import AttentionBackend
    from hallm.platforms.ops import OpTable

# cgroup files that cap this container's memory (v2, then v1); "max" or a huge value: no cap.
_CGROUP_LIMITS = (
    ("memory.max", "memory.current"),
    ("memory/memory.limit_in_bytes", "memory/memory.usage_in_bytes"),
)
_NO_LIMIT = 1 << 60


class CpuPlatform(Platform):
    """The host CPU: fp32 (default) and bf16 models, native C kernels with pure-torch fallbacks."""

    name: ClassVar[str] = "cpu"
    device_type: ClassVar[str] = "cpu"
    dist_backend: ClassVar[str] = "gloo"
    ray_resource: ClassVar[str | None] = "CPU"
    auto_priority: ClassVar[int] = 0
    # Released together with the core (hallm-cpu pins hallm<0.2), so it speaks the core's API.
    api_version: ClassVar[str] = API_VERSION

    @classmethod
    def probe(cls) -> Probe:
        """The host CPU is always there; the reason says how many cores this process may use."""
        try:
            cores = usable_cores()
            threads = ""
            # Read torch's thread count only if torch is already loaded: importing it here would
            # make the probe slow.
            torch = sys.modules.get("torch")
            if torch is not None:
                threads = f" (torch threads {torch.get_num_threads()})"
            return Probe(True, f"host CPU, {cores} cores{threads}", device_count=1)
        except Exception as exc:  # a probe never raises; the CPU is still usable
            return Probe(True, f"host CPU (core count unknown: {exc})", device_count=1)

    def capabilities(self) -> Capabilities:
        """fp32 first (the default: fast fp16 matmuls are rare on CPUs, bf16 is often emulated)."""
        return Capabilities(
            dtypes=("float32", "bfloat16"),
            kv_cache_dtypes=("auto",),
            graph_capture=False,
            max_world_size=None,  # gloo tensor parallelism: any number of ranks
            torch_compile=False,
            async_scheduling=False,
        )

    def attention_backends(self) -> Sequence[type[AttentionBackend]]:
        """The native C kernel first (when it builds), then the pure-torch reference."""
        from hallm_cpu.attention import CpuNativeAttention, CpuReferenceAttention

        return [CpuNativeAttention, CpuReferenceAttention]

    def op_table(self) -> OpTable:
        """The native kernels (`hallm_cpu.ops`)."""
        from hallm_cpu.ops import cpu_op_table

        return cpu_op_table()

    def memory_info(self, device_index: int = 0) -> tuple[int, int]:
        """(available, total) host memory in bytes, capped by the container's cgroup limit."""
        vm = psutil.virtual_memory()
        free, total = int(vm.available), int(vm.total)
        capped = cgroup_memory()
        if capped is not None:
            limit, used = capped
            total = min(total, limit)
            free = max(0, min(free, limit - used))
        return free, total

    def default_kv_cache_bytes(self) -> int | None:
        """4 GiB: host memory is shared with the OS and every other process, so the pool does not
        grow with the machine (vLLM's CPU backend defaults to the same); `--kv-cache-memory-bytes`
        changes it."""
        return DEFAULT_KV_CACHE_BYTES

    def device_name(self, index: int = 0) -> str:
        """The CPU model as /proc/cpuinfo names it and the number of threads torch uses, e.g.
        "<model name> (8 threads)"."""
        import torch

        return f"{cpu_model_name()} ({torch.get_num_threads()} threads)"


DEFAULT_KV_CACHE_BYTES = 4 * 2**30


def usable_cores() -> int:
    """Cores this process may run on (its affinity mask, where the OS has one)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def cpu_model_name() -> str:
    """The CPU's model name from /proc/cpuinfo (Linux), else what the platform module knows."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() in ("model name", "Model", "cpu model") and value.strip():
                    return value.strip()
    except OSError:
        pass
    return _host.processor() or _host.machine() or "CPU"


def cgroup_memory(root: Path = Path("/sys/fs/cgroup")) -> tuple[int, int] | None:
    """(limit, usage) in bytes of the container's memory cgroup, or None when it has no limit."""
    for limit_file, usage_file in _CGROUP_LIMITS:
        try:
            raw = (root / limit_file).read_text().strip()
            if raw == "max":
                return None
            limit = int(raw)
            usage = int((root / usage_file).read_text().strip())
        except (OSError, ValueError):
            continue
        return None if limit >= _NO_LIMIT else (limit, usage)
    return None
