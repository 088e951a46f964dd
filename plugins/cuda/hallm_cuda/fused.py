"""Swap the decoder layers' elementwise chains for fused Triton kernels (`CudaPlatform.compile_model`).

hallm's native models build their layers from `hallm.core.layers`: `RMSNorm` (optionally with
the residual add), `RotaryEmbedding`, `GatedMLP`. Each is a chain of small PyTorch kernels; on a
GPU those launches, not bytes, dominate a small model's decode step. `fuse_layers` replaces, in
place, every such module `hallm.ops.fusion` recognizes with one that calls
`hallm.ops.triton.fused`; the parameters are shared, not copied. HALLM_CUDA_FUSED=0 turns the
swap off.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn

from hallm.ops.fusion import RMS_NORM, ROTARY, SILU_GATED_MLP, swap_layers


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


_FUSED = {RMS_NORM: FusedRMSNorm, ROTARY: FusedRotaryEmbedding, SILU_GATED_MLP: FusedGatedMLP}


def fuse_layers(model: Any) -> Any:
    """Replace recognized layer modules of `model` in place (see the module doc); return it."""
    if os.environ.get("HALLM_CUDA_FUSED", "1") != "0":
        swap_layers(model, lambda kind, module: _FUSED[kind](module), "fused Triton layers")
    return model
