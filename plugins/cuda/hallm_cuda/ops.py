"""The CUDA plugin's op table: hallm's Triton kernels for the ops of hallm's layers.

Each elementwise entry replaces a chain of small PyTorch kernels with one launch
(`hallm.ops.triton.fused`): on a GPU a small model's decode step is launch-bound, not
bandwidth-bound. Few-row projections run the skinny GEMM (`hallm_cuda.skinny`), and the
Llama-family decoder stack of small models folds each layer's input RMSNorm and rotary into its
qkv projection (`hallm_cuda.fused_decoder`).
"""

from __future__ import annotations

import functools

from hallm.ops.triton.target import TritonTarget
from hallm.platforms.ops import OpTable
from hallm_cuda.fused_decoder import decoder_stack
from hallm_cuda.skinny import linear_op


def cuda_op_table(target: TritonTarget) -> OpTable:
    """The table for a GPU described by `target` (its SM count, and whether kernels use PDL)."""
    from hallm.ops.triton import fused

    return OpTable(
        rms_norm=functools.partial(fused.rms_norm, target=target),
        rotary=functools.partial(fused.rotary, target=target),
        silu_and_mul=functools.partial(fused.silu_and_mul, target=target),
        linear=linear_op(target),
        llama_decoder_stack=functools.partial(decoder_stack, target=target),
    )
