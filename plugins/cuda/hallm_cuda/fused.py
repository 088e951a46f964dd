"""Swap the decoder layers' elementwise chains for fused Triton kernels (`CudaPlatform.compile_model`).

hallm's native models build their layers from `hallm.core.layers`: `RMSNorm` (optionally with
the residual add), `RotaryEmbedding`, `GatedMLP`. Each is a chain of small PyTorch kernels; on a
GPU those launches, not bytes, dominate a small model's decode step. `fuse_layers` replaces, in
place, every such module it recognizes (by class name and attributes; a plugin imports no core
module) with one that calls `hallm.ops.triton.fused`; the parameters are shared, not copied.
Modules it does not recognize (the generic transformers path, long-rope rotary, activations
other than SiLU) are left alone. HALLM_CUDA_FUSED=0 turns the swap off.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

logger = logging.getLogger("hallm.cuda")


class FusedRMSNorm(nn.Module):
    """RMSNorm (with an optional fused residual add) in one kernel; same call signature."""

    def __init__(self, norm: nn.Module) -> None:
        super().__init__()
        self.weight = norm.weight
        self.eps = float(norm.eps)

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        from hallm.ops.triton.fused import rms_norm

        return rms_norm(x, self.weight, self.eps, residual)


class FusedRotaryEmbedding(nn.Module):
    """forward(positions, q, k) -> (q, k) rotated, in one kernel for both."""

    def __init__(self, rotary: nn.Module) -> None:
        super().__init__()
        self.register_buffer("inv_freq", rotary.inv_freq.detach().float().contiguous(), persistent=False)
        self.attention_scaling = float(rotary.attention_scaling)
        self.rotary_dim = int(rotary.rotary_dim)

    def forward(
        self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        from hallm.ops.triton.fused import rotary

        return rotary(positions, q, k, self.inv_freq, self.attention_scaling)


class FusedGatedMLP(nn.Module):
    """down(silu(gate) * up) with the activation and product in one kernel."""

    def __init__(self, mlp: nn.Module) -> None:
        super().__init__()
        self.intermediate_size = mlp.intermediate_size
        self.gate_up_proj = mlp.gate_up_proj
        self.down_proj = mlp.down_proj

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from hallm.ops.triton.fused import silu_and_mul

        return self.down_proj(silu_and_mul(self.gate_up_proj(x)))


def _replacement(module: nn.Module) -> nn.Module | None:
    cls = type(module)
    if not cls.__module__.startswith("hallm.core.layers"):
        return None
    if cls.__name__ == "RMSNorm" and hasattr(module, "eps"):
        return FusedRMSNorm(module)
    if (
        cls.__name__ == "RotaryEmbedding"
        and getattr(module, "original_max_position", None) is None  # no long-rope switch
        and 2 * module.inv_freq.numel() == getattr(module, "rotary_dim", -1)
    ):
        return FusedRotaryEmbedding(module)
    if cls.__name__ == "GatedMLP" and getattr(module, "act", None) is F.silu:
        return FusedGatedMLP(module)
    return None


def fuse_layers(model: Any) -> Any:
    """Replace recognized layer modules of `model` in place (see the module doc); return it."""
    if os.environ.get("HALLM_CUDA_FUSED", "1") == "0" or not isinstance(model, nn.Module):
        return model
    counts: dict[str, int] = {}
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            new = _replacement(child)
            if new is not None:
                setattr(parent, name, new)
                counts[type(child).__name__] = counts.get(type(child).__name__, 0) + 1
    if counts:
        logger.info("fused Triton layers: %s", ", ".join(f"{n} x{c}" for n, c in sorted(counts.items())))
    return model
