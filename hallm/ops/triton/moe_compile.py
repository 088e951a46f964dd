"""`compile_check`'s variants of the fused-MoE kernels (`hallm.ops.triton.fused_moe`): the launches
`fused_moe` makes, compiled ahead of any GPU."""

from __future__ import annotations

from types import SimpleNamespace

import torch

from hallm.ops.triton.fused_moe import ACT_CLAMPED_SWIGLU, ACT_SILU_GLU, tiles
from hallm.ops.triton.moe_align import moe_config
from hallm.ops.triton.skinny_launch import CompileVariant
from hallm.ops.triton.target import TritonTarget

#: Qwen3-30B-A3B's router shape: experts, top-k (the tiles do not depend on H or I).
COMPILE_SHAPE = (128, 8)
#: (tokens, gpt-oss's biases and clamped SwiGLU) of each compiled launch: a decode step, a
#: prefill, and a prefill of gpt-oss's experts.
LAUNCHES = ((1, False), (512, False), (512, True))


def compile_variants(
    kernels: SimpleNamespace, sig_dtypes: tuple[str, ...], target: TritonTarget
) -> list[CompileVariant]:
    """The variants of both MoE kernels (`fused_moe.jit_kernels()`), for dtypes named as in a
    Triton signature ("bf16", "fp16", "fp32"), at Qwen3-30B-A3B's router shape: a decode step of
    one token (16-row blocks) and a prefill of 512 tokens (64-row blocks), the prefill also with
    gpt-oss's biases and activation, with the launch parameters `fused_moe` picks on `target`."""
    torch_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
    e, top_k = COMPILE_SHAPE
    # a launch's sizes and strides at these shapes are multiples of 16: Triton specializes on
    # that (vectorized, asynchronously pipelined loads), so compile so too
    aligned = ("inter", "hidden", "w_stride_e", "w_stride_n", "out_stride")
    common = {"sorted_ids_ptr": "*i32", "block_experts_ptr": "*i32", "num_pairs": "i32"}
    out: list[CompileVariant] = []
    for t in sig_dtypes:
        for tokens, gpt_oss in LAUNCHES:
            cfg = moe_config(tokens * top_k, e, torch_dtype[t], target)
            opts = {"num_warps": cfg.num_warps, "num_stages": cfg.num_stages}
            shape = {**tiles(cfg), "DOT_F32": t == "fp32"}
            act = ACT_CLAMPED_SWIGLU if gpt_oss else ACT_SILU_GLU
            suffix = "-bias-swiglu" if gpt_oss else ""
            gate_up_sig = {
                "x_ptr": f"*{t}",
                "w_ptr": f"*{t}",
                "out_ptr": f"*{t}",
                "b_ptr": f"*{t}",
                **common,
                "inter": "i32",
                "hidden": "i32",
                "x_stride": "i32",
                "w_stride_e": "i32",
                "w_stride_n": "i32",
                "out_stride": "i32",
                "b_stride_e": "i32",
                "alpha": "fp32",
                "limit": "fp32",
            }
            down_sig = {
                "a_ptr": f"*{t}",
                "w_ptr": f"*{t}",
                "out_ptr": "*fp32",
                "topk_w_ptr": "*fp32",
                "b_ptr": f"*{t}",
                **common,
                "hidden": "i32",
                "inter": "i32",
                "a_stride": "i32",
                "w_stride_e": "i32",
                "w_stride_n": "i32",
                "out_stride": "i32",
                "b_stride_e": "i32",
            }
            out.append(
                (
                    f"moe-gate-up-{t}-m{cfg.block_m}{suffix}",
                    kernels.gate_up,
                    gate_up_sig,
                    {"TOP_K": top_k, **shape, "HAS_BIAS": gpt_oss, "ACTIVATION": act},
                    {**opts, "aligned": (*aligned, "x_stride", "b_stride_e")},
                )
            )
            out.append(
                (
                    f"moe-down-{t}-m{cfg.block_m}{suffix}",
                    kernels.down,
                    down_sig,
                    {**shape, "HAS_BIAS": gpt_oss},
                    {**opts, "aligned": (*aligned, "a_stride", "b_stride_e")},
                )
            )
    return out
