"""The CPU plugin's op table: the native kernels of `hallm_cpu.native` for the ops of hallm's
layers.

On a CPU each eager PyTorch op costs microseconds of dispatch and a pass over memory; the RMSNorm
+ residual chain, the rotary embedding and SiLU-and-mul are ~20 such ops per layer, each done
here in one native call. Without the native kernels (no C compiler, or HALLM_CPU_NATIVE=0) only
the linear layers' layout choices remain.
"""

from __future__ import annotations

import torch

from hallm.platforms.ops import OpTable
from hallm_cpu import native
from hallm_cpu.decoder import decoder_stack
from hallm_cpu.linear import linear_op


def rotary(
    positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, inv_freq: torch.Tensor, scaling: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """The table's `rotary`, in place: q and k are views into the step's fresh QKV output."""
    if q.stride(-1) != 1 or q.stride(-2) != q.shape[-1]:
        q = q.contiguous()
    if k.stride(-1) != 1 or k.stride(-2) != k.shape[-1]:
        k = k.contiguous()
    native.rotary_(positions.to(torch.int64), q, k, inv_freq.float().contiguous(), scaling)
    return q, k


def cpu_op_table() -> OpTable:
    """Native kernels where they are built, else only the linear layouts."""
    if not native.available():
        return OpTable(linear=linear_op(use_native=False))
    return OpTable(
        rms_norm=native.rms_norm,
        rotary=rotary,
        silu_and_mul=native.silu_and_mul,
        linear=linear_op(use_native=True),
        llama_decoder_stack=decoder_stack,
    )
