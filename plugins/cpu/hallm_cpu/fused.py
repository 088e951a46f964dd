"""Decoder-layer modules backed by the native CPU kernels (`CpuPlatform.compile_model`).

On a CPU, each eager PyTorch op costs microseconds of dispatch and a pass over memory; the
RMSNorm + residual chain, the rotary embedding (which also recomputes its cos/sin tables per
layer) and SiLU-and-mul are ~20 such ops per layer. The modules here do each in one call of
`hallm_cpu.native`, with the parameters shared (not copied) from the modules they replace. The
rotary embedding rotates q and k in place: they are views into the step's fresh QKV output.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from hallm.ops.fusion import RMS_NORM, ROTARY, SILU_GATED_MLP, swap_layers
from hallm_cpu import native


class CpuRMSNorm(nn.Module):
    """RMSNorm (with an optional fused residual add) in one call; same signature as the core's."""

    def __init__(self, norm: nn.Module) -> None:
        super().__init__()
        self.weight = norm.weight
        self.eps = float(norm.eps)

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        return native.rms_norm(x, self.weight, self.eps, residual)


class CpuRotaryEmbedding(nn.Module):
    """forward(positions [T], q [T, Hq, D], k [T, Hk, D]) -> (q, k), rotated in place."""

    def __init__(self, rotary: nn.Module) -> None:
        super().__init__()
        self.register_buffer("inv_freq", rotary.inv_freq.detach().float().contiguous(), persistent=False)
        self.attention_scaling = float(rotary.attention_scaling)
        self.rotary_dim = int(rotary.rotary_dim)

    def forward(
        self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if q.stride(-1) != 1 or q.stride(-2) != q.shape[-1]:
            q = q.contiguous()
        if k.stride(-1) != 1 or k.stride(-2) != k.shape[-1]:
            k = k.contiguous()
        native.rotary_(positions.to(torch.int64), q, k, self.inv_freq, self.attention_scaling)
        return q, k


class CpuGatedMLP(nn.Module):
    """down(silu(gate) * up) with the activation and product in one call."""

    def __init__(self, mlp: nn.Module) -> None:
        super().__init__()
        self.intermediate_size = mlp.intermediate_size
        self.gate_up_proj = mlp.gate_up_proj
        self.down_proj = mlp.down_proj

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(native.silu_and_mul(self.gate_up_proj(x)))


_NATIVE = {RMS_NORM: CpuRMSNorm, ROTARY: CpuRotaryEmbedding, SILU_GATED_MLP: CpuGatedMLP}


def fuse_layers(model: Any) -> Any:
    """Swap recognized layer modules for native ones when the kernels are built; return the model."""
    if native.available():
        swap_layers(
            model,
            lambda kind, module: _NATIVE[kind](module) if kind in _NATIVE else None,
            "native CPU layers",
        )
    return model
