"""What the CUDA and ROCm platforms share: torch's `torch.cuda` API, which a ROCm build of torch
also speaks (there `torch.cuda` is HIP), and the reading of which build torch is (also hallm-xpu's).

`torch_build(name)` answers torch.version.cuda / .hip / .xpu without importing
torch when it is not loaded yet, so a probe stays cheap and leaves the device runtime
uninitialized. `TorchCudaRuntime` is the device-runtime half of a Platform for either build
(device, memory, seeding, synchronization through `torch.cuda`). Importing this module imports
no torch.
"""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

__all__ = ["TorchCudaRuntime", "torch_build", "torch_build_versions", "version_field"]


def torch_build_versions() -> tuple[str | None, str | None]:
    """(torch.version.cuda, torch.version.hip) of the installed torch (see `torch_build`).
    (None, None): a build for neither (CPU-only, XPU). Raises ModuleNotFoundError when torch is
    not installed."""
    return torch_build("cuda"), torch_build("hip")


def torch_build(name: str) -> str | None:
    """`torch.version.<name>` ("cuda", "hip", "xpu") of the installed torch, importing torch only
    if it is already loaded or its version file cannot be read. Raises ModuleNotFoundError when
    torch is not installed."""
    loaded = sys.modules.get("torch")
    if loaded is not None:
        return getattr(loaded.version, name, None)
    spec = importlib.util.find_spec("torch")
    if spec is None:
        raise ModuleNotFoundError("torch is not installed")
    for folder in spec.submodule_search_locations or ():
        try:
            text = (Path(folder) / "version.py").read_text()
        except OSError:
            continue
        return version_field(text, name)
    import torch

    return getattr(torch.version, name, None)


def version_field(text: str, name: str) -> str | None:
    """The value of `name = '...'` (or `name: ... = ...`) in torch/version.py; None for None."""
    match = re.search(rf"^{name}\s*(?::[^=]*)?=\s*(.+?)\s*$", text, re.MULTILINE)
    if match is None:
        return None
    value = match.group(1).strip().strip("'\"")
    return None if value in ("None", "") else value


class TorchCudaRuntime:
    """The device-runtime methods of a Platform whose devices are `torch.cuda` devices (a CUDA or
    a ROCm build of torch); mixed in before `Platform`."""

    def device(self, index: int = 0) -> torch.device:
        import torch

        return torch.device("cuda", index)

    def set_device(self, index: int) -> None:
        import torch

        torch.cuda.set_device(index)

    def synchronize(self) -> None:
        import torch

        torch.cuda.synchronize()

    def memory_info(self, device_index: int = 0) -> tuple[int, int]:
        import torch

        free, total = torch.cuda.mem_get_info(device_index)
        return int(free), int(total)

    def empty_cache(self) -> None:
        import torch

        torch.cuda.empty_cache()

    def manual_seed(self, seed: int) -> None:
        import torch

        torch.manual_seed(seed)  # seeds the CPU and every visible device
        torch.cuda.manual_seed_all(seed)

    def peak_memory_bytes(self) -> int | None:
        import torch

        return int(torch.cuda.max_memory_allocated())

    def allocated_memory_bytes(self) -> int | None:
        import torch

        return int(torch.cuda.memory_allocated())

    def reset_peak_memory(self) -> None:
        import torch

        torch.cuda.reset_peak_memory_stats()
