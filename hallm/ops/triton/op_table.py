"""An op table of hallm's Triton kernels for the ops of hallm's layers, for any GPU Triton
compiles for: the CUDA and ROCm plugins pass their device's `TritonTarget`.

Each elementwise entry replaces a chain of small PyTorch kernels with one launch
(`hallm.ops.triton.fused`): on a GPU a small model's decode step is launch-bound, not
bandwidth-bound. Few-row projections run the skinny GEMM (`hallm.ops.triton.skinny_linear`), and
the Llama-family decoder stack of small models folds each layer's input RMSNorm and rotary into
its qkv projection (`hallm.ops.triton.fused_decoder`). Mixture-of-experts layers run two
expert-grouped GEMMs (`hallm.ops.triton.fused_moe`). The sampler's temperature-only rows draw
their tokens in one pass over the logits (`hallm.ops.triton.sampling`).
"""

from __future__ import annotations

import functools

from hallm.ops.triton import fused, fused_moe, sampling
from hallm.ops.triton.fused_decoder import decoder_stack
from hallm.ops.triton.skinny_linear import linear_op
from hallm.ops.triton.target import TritonTarget
from hallm.platforms.ops import OpTable


def triton_op_table(target: TritonTarget) -> OpTable:
    """The table for `target` (on the GPU, `x.is_cuda` holds for CUDA and HIP tensors alike)."""
    return OpTable(
        rms_norm=functools.partial(fused.rms_norm, target=target),
        rotary=functools.partial(fused.rotary, target=target),
        silu_and_mul=functools.partial(fused.silu_and_mul, target=target),
        linear=linear_op(target),
        llama_decoder_stack=functools.partial(decoder_stack, target=target),
        fused_moe=functools.partial(fused_moe.fused_moe, target=target),
        temperature_sample=functools.partial(sampling.temperature_sample, target=target),
    )
