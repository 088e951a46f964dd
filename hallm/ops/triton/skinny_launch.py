"""How a skinny-GEMM launch is configured (`hallm.ops.triton.skinny_gemm`): its tiles and K split
from the shapes, the prologue and epilogue inputs, the pointer arguments with the stand-ins for
absent inputs, the epilogue codes, and the constexprs. `skinny_linear` builds its launches from
these, and so does `compile_variants`, the list `compile_check` compiles, so the kernels CI
compiles are the ones a launch runs. This module imports no kernel: `skinny_gemm` imports it."""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
import triton
import triton.language as tl

from hallm.ops.triton.target import GENERIC, TritonTarget

#: Most activation rows the kernel takes; larger steps are GEMMs (use cuBLAS).
MAX_ROWS = 64
#: Programs per SM a launch aims for before it splits K.
_PROGRAMS_PER_SM = 2
#: Threads per skinny-GEMM program (4 warps on NVIDIA, 2 wavefronts on AMD), as tuned.
SKINNY_THREADS = 128
_MAX_SPLIT_K = 8

#: The EPILOGUE constexpr: the plain product, or the rotary embedding of the q and k heads.
PLAIN = tl.constexpr(0)
ROTARY = tl.constexpr(1)

#: A kernel variant for `compile_check`: (name, kernel, signature, constexprs, compile options).
CompileVariant = tuple[str, Any, dict[str, str], dict[str, Any], dict[str, Any]]


@dataclasses.dataclass(frozen=True)
class RMSNormPrologue:
    """Normalize x (or x + residual) by `RMSNorm(weight, eps)` before the product.

    weight [K]; residual [M, K] (last dim contiguous) or None. With a residual the launch also
    returns x + residual, the residual stream that `RMSNorm.forward(x, residual)` returns."""

    weight: torch.Tensor
    eps: float
    residual: torch.Tensor | None = None


@dataclasses.dataclass(frozen=True)
class RotaryEpilogue:
    """Rotate the first `rotated_heads` heads of the output (q, then k of a fused qkv
    projection; v's heads pass through) by `RotaryEmbedding` (full NeoX rotate-half).

    positions [M] (any int dtype); inv_freq float32 [head_size / 2]; scaling the
    `attention_scaling` the cos/sin tables are multiplied by."""

    positions: torch.Tensor
    inv_freq: torch.Tensor
    scaling: float
    head_size: int
    rotated_heads: int


@dataclasses.dataclass(frozen=True)
class SkinnyConfig:
    """Tile shape and K split of one skinny-GEMM launch."""

    block_m: int
    block_n: int
    block_k: int
    split_k: int
    num_warps: int = 4
    num_stages: int = 3


def skinny_config(
    m: int, n: int, k: int, target: TritonTarget | None = None, paired: bool = False
) -> SkinnyConfig:
    """Tiles for M rows x N outputs x K inputs; a K split when the column blocks leave SMs idle.

    A paired launch (the rotary epilogue: a program owns two columns of each head) splits K
    into one tile per program whatever the column count (at most 8 splits: past 8 tiles of K a
    program takes several): the fused decoder stack's launches are latency-bound, and a program
    whose weights are one tile loads all of them before its dependency wait, so after it only
    the (L2-resident) activations and the partials' merge remain. Decided from shapes only
    (host ints fixed for a captured batch size). A program has SKINNY_THREADS threads on
    every target (`TritonTarget.warps`)."""
    target = target or GENERIC
    warps = target.warps(SKINNY_THREADS)
    block_m = max(16, triton.next_power_of_2(m))
    block_k = 256 if block_m <= 16 else 128  # (BLOCK_M + 2 BLOCK_N) x BLOCK_K x 3 stages < 99 KB
    block_n = 16
    if paired:
        split = min(_MAX_SPLIT_K, triton.cdiv(k, block_k))
        # one iteration has nothing to pipeline: a single stage measured faster at decode sizes
        # (the fused decoder layer's launches in benchmarks/results/gpu.md)
        stages = 1 if split * block_k >= k else 3
        return SkinnyConfig(block_m, block_n, block_k, split_k=split, num_warps=warps, num_stages=stages)
    col_blocks = triton.cdiv(n, block_n)
    split = 1
    programs = _PROGRAMS_PER_SM * target.num_sms
    while split < _MAX_SPLIT_K and col_blocks * split < programs and k // (2 * split * block_k) >= 2:
        split *= 2
    return SkinnyConfig(block_m=block_m, block_n=block_n, block_k=block_k, split_k=split, num_warps=warps)


def counters_for(n: int, device: torch.device | str) -> torch.Tensor:
    """The zeroed int32 counters a split-K launch over N outputs needs (one per column block
    of the narrowest tile); every launch leaves them zero again, so a caller keeps one."""
    return torch.zeros(triton.cdiv(n, 16), dtype=torch.int32, device=device)


#: The kernel's pointer arguments, in order; an absent input is passed as the stand-in named
#: here (any pointer of the launch: the kernel does not read it). `compile_check` builds the
#: same specializations from this table.
POINTERS = (
    "x_ptr", "w_ptr", "bias_ptr", "out_ptr", "part_ptr", "counter_ptr",
    "res_ptr", "res_out_ptr", "norm_w_ptr", "pos_ptr", "inv_freq_ptr",
)  # fmt: skip
STAND_INS = {
    "bias_ptr": "w_ptr",
    "part_ptr": "out_ptr",
    "counter_ptr": "out_ptr",
    "res_ptr": "x_ptr",
    "res_out_ptr": "out_ptr",
    "norm_w_ptr": "w_ptr",
    "pos_ptr": "out_ptr",
    "inv_freq_ptr": "out_ptr",
}


def pointer_args(present: dict[str, torch.Tensor]) -> list[torch.Tensor]:
    """The kernel's pointer arguments in order, from the present ones (x, w, out at least)."""
    return [present[name] if name in present else present[STAND_INS[name]] for name in POINTERS]


def launch_constexprs(
    cfg: SkinnyConfig,
    k: int,
    *,
    bias: bool,
    epilogue: int,
    norm: bool,
    residual: bool,
    split_k: int,
    dot_f32: bool,
    rotary: RotaryEpilogue | None = None,
) -> dict[str, object]:
    """The constexprs of one launch (`skinny_linear` and `compile_check` both use this)."""
    return {
        "HAS_BIAS": bias,
        "EPILOGUE": int(epilogue),
        "NORM": norm,
        "RESIDUAL": residual,
        "SPLIT_K": split_k,
        "DOT_F32": dot_f32,
        "BLOCK_M": cfg.block_m,
        "BLOCK_N": cfg.block_n,
        "BLOCK_K": cfg.block_k,
        "NORM_TILES": triton.cdiv(k, cfg.block_k),
        "HEAD_SIZE": rotary.head_size if rotary is not None else 32,
        "ROTATED_HEADS": rotary.rotated_heads if rotary is not None else 0,
    }


def split_k_of(cfg: SkinnyConfig, k: int) -> tuple[int, int]:
    """(K per split, splits) of a launch: whole tiles per split, so rounding may need fewer
    splits than `cfg.split_k` (8 asked over 9 tiles of K: 5 splits of 2 tiles)."""
    k_per_split = triton.cdiv(triton.cdiv(k, cfg.split_k), cfg.block_k) * cfg.block_k
    return k_per_split, triton.cdiv(k, k_per_split)


def compile_variants(
    kernel: Any, sig_dtypes: tuple[str, ...], target: TritonTarget | None = None
) -> list[CompileVariant]:
    """`compile_check`'s variants of the skinny GEMM `kernel` (`skinny_gemm.jit_kernels()`), for
    16-bit dtypes named as in a Triton signature ("bf16", "fp16"). The kernel as `skinny_linear`
    launches it (its pointer stand-ins and constexprs): 1 and 64 rows, split-K (Qwen2.5-0.5B's
    down projection), with bias (its qkv); and as the fused decoder stack launches it: qkv with
    the RMSNorm prologue (with the residual add, and without it: the first layer) and the
    rotary epilogue. Launch shapes as on `target` (None: `GENERIC`)."""
    out: list[CompileVariant] = []
    # Qwen2.5-0.5B's heads: 64 dims, 14 q + 2 k rotated
    rotary = RotaryEpilogue(torch.empty(0), torch.empty(0), 1.0, 64, 16)
    # label, N, K, bias, epilogue, norm prologue, residual add
    shapes = (
        ("qkv", 1152, 896, True, PLAIN, False, False),
        ("down", 896, 4864, False, PLAIN, False, False),
        ("qkv-norm-rotary", 1152, 896, True, ROTARY, True, True),
        ("qkv-norm-rotary-first", 1152, 896, True, ROTARY, True, False),
    )
    for t in sig_dtypes:
        for rows in (1, 64):
            for label, n, kk, bias, epilogue, norm, residual in shapes:
                cfg = skinny_config(rows, n, kk, target, paired=epilogue == ROTARY)
                _, split_k = split_k_of(cfg, kk)
                present = {"x_ptr": t, "w_ptr": t, "out_ptr": t}
                if bias:
                    present["bias_ptr"] = t
                if split_k > 1:
                    present["part_ptr"], present["counter_ptr"] = "fp32", "i32"
                if norm:
                    present["norm_w_ptr"] = t
                if residual:
                    present["res_ptr"], present["res_out_ptr"] = t, t
                if epilogue == ROTARY:
                    present["pos_ptr"], present["inv_freq_ptr"] = "i64", "fp32"
                signature = {
                    name: "*" + present.get(name, present.get(STAND_INS.get(name, ""), ""))
                    for name in POINTERS
                }
                signature.update(
                    {
                        "M": "i32",
                        "N": "i32",
                        "K": "i32",
                        "x_stride": "i32",
                        "out_stride": "i32",
                        "res_stride": "i32",
                        "K_PER_SPLIT": "i32",
                        "eps": "fp32",
                        "rope_scaling": "fp32",
                    }
                )
                constexprs = launch_constexprs(
                    cfg,
                    kk,
                    bias=bias,
                    epilogue=epilogue,
                    norm=norm,
                    residual=residual,
                    split_k=split_k,
                    dot_f32=False,
                    rotary=rotary if epilogue == ROTARY else None,
                )
                out.append(
                    (
                        f"skinny-{label}-{t}-m{rows}",
                        kernel,
                        signature,
                        constexprs,
                        {
                            "num_warps": cfg.num_warps,
                            "num_stages": cfg.num_stages,
                            # these shapes' sizes and strides are multiples of 16, as in a launch
                            "aligned": ("N", "K", "x_stride", "out_stride", "res_stride", "K_PER_SPLIT"),
                        },
                    )
                )
    return out
