"""The fused mixture-of-experts MLP as two grouped GEMMs: the Triton op table's `fused_moe` entry
(`hallm.platforms.ops.FusedMoEOp`).

The step's (token, expert) pairs are sorted by expert and each expert's run padded to the row
block (`hallm.ops.triton.moe_align`), so every row block belongs to one expert:
1. gate/up: a program multiplies one block of rows (gathered from the hidden states by token)
   by one column tile of its expert's gate and up projections (plus their biases, when given),
   and stores the declared activation of the pair (`silu(gate) * up`, or gpt-oss's clamped
   SwiGLU): intermediate [T * K, I];
2. down: a program multiplies one block of intermediate rows by one column tile of its expert's
   down projection (plus its bias) and scales each row by its routing weight: float32 [T * K, H];
3. the K rows of each token are summed (one small torch reduction, in float32).
Only blocks of experts some token chose exist, so a decode step reads only the chosen experts'
weights, each tile once per block. Arithmetic is float32 in the kernels, rounding to the
activation dtype where the reference (`hallm.ops.reference_ops.fused_moe`) rounds: the gate and
up projections, each op of the activation, the down projection.
"""

from __future__ import annotations

import functools
from types import SimpleNamespace

import torch
import triton
import triton.language as tl

from hallm.ops.triton.moe_align import MoEConfig, align_by_expert, moe_config
from hallm.ops.triton.runtime import decorate, gdc_launch_dependents, gdc_wait, interpreting, pdl_launch
from hallm.ops.triton.target import TritonTarget
from hallm.platforms.ops import SILU_GLU, ClampedSwiGLU, MoEActivation

#: The gate/up kernel's ACTIVATION codes (`hallm.platforms.ops.MoEActivation`).
ACT_SILU_GLU = 0
ACT_CLAMPED_SWIGLU = 1


def _moe_gate_up_kernel(  # type: ignore[no-untyped-def]
    x_ptr,  # hidden [T, H], last dim contiguous
    w_ptr,  # w13 [E, 2I, H], last dim contiguous
    out_ptr,  # intermediate [T * K, I]
    b_ptr,  # w13_bias [E, 2I], last dim contiguous (read only with HAS_BIAS)
    sorted_ids_ptr,  # int32 [max_rows]: pair indices, padding = num_pairs
    block_experts_ptr,  # int32 [max_rows / BLOCK_M]: -1 = no expert
    num_pairs,
    inter,  # I
    hidden,  # H
    x_stride,
    w_stride_e,
    w_stride_n,
    out_stride,
    b_stride_e,
    alpha,  # ClampedSwiGLU's parameters (ACTIVATION 1)
    limit,
    TOP_K: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    DOT_F32: tl.constexpr,
    USE_PDL: tl.constexpr = False,
    HAS_BIAS: tl.constexpr = False,
    ACTIVATION: tl.constexpr = 0,  # ACT_SILU_GLU or ACT_CLAMPED_SWIGLU
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    if USE_PDL:  # the plan and the hidden states come from the kernels before: wait first
        gdc_wait()
        gdc_launch_dependents()
    expert = tl.load(block_experts_ptr + pid_m)
    if expert < 0:
        return
    act_dtype = out_ptr.dtype.element_ty
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    pair = tl.load(sorted_ids_ptr + rows)
    row_mask = pair < num_pairs
    token = (pair // TOP_K).to(tl.int64)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < inter
    rk = tl.arange(0, BLOCK_K)
    x_ptrs = x_ptr + token[:, None] * x_stride + rk[None, :]  # [BLOCK_M, BLOCK_K]
    gate_ptrs = w_ptr + expert.to(tl.int64) * w_stride_e + cols[None, :] * w_stride_n + rk[:, None]
    up_ptrs = gate_ptrs + inter * w_stride_n  # [BLOCK_K, BLOCK_N]
    acc_gate = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    acc_up = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, hidden, BLOCK_K):
        k_mask = (k0 + rk) < hidden
        x = tl.load(x_ptrs, mask=row_mask[:, None] & k_mask[None, :], other=0.0)
        w_mask = k_mask[:, None] & col_mask[None, :]
        g = tl.load(gate_ptrs, mask=w_mask, other=0.0)
        u = tl.load(up_ptrs, mask=w_mask, other=0.0)
        if DOT_F32:
            xf = x.to(tl.float32)
            acc_gate = tl.dot(xf, g.to(tl.float32), acc_gate, input_precision="ieee")
            acc_up = tl.dot(xf, u.to(tl.float32), acc_up, input_precision="ieee")
        else:
            acc_gate = tl.dot(x, g, acc_gate)
            acc_up = tl.dot(x, u, acc_up)
        x_ptrs += BLOCK_K
        gate_ptrs += BLOCK_K
        up_ptrs += BLOCK_K
    if HAS_BIAS:  # added in float32 before the projection rounds (F.linear with a bias)
        b_row = b_ptr + expert.to(tl.int64) * b_stride_e
        acc_gate += tl.load(b_row + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
        acc_up += tl.load(b_row + inter + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    # rounded where the reference rounds: each projection, then each op of the activation
    gate = acc_gate.to(act_dtype).to(tl.float32)
    up = acc_up.to(act_dtype).to(tl.float32)
    if ACTIVATION == 1:  # ACT_CLAMPED_SWIGLU: gate * sigmoid(alpha * gate) * (up + 1), both clamped
        gate = tl.minimum(gate, limit)
        up = tl.minimum(tl.maximum(up, -limit), limit)
        sig = (1.0 / (1.0 + tl.exp(-(gate * alpha).to(act_dtype).to(tl.float32)))).to(act_dtype)
        glu = (gate * sig.to(tl.float32)).to(act_dtype).to(tl.float32)
        y = (up + 1.0).to(act_dtype).to(tl.float32) * glu
    else:  # silu(gate) * up
        y = (gate / (1.0 + tl.exp(-gate))).to(act_dtype).to(tl.float32) * up
    out_ptrs = out_ptr + pair.to(tl.int64)[:, None] * out_stride + cols[None, :]
    tl.store(out_ptrs, y.to(act_dtype), mask=row_mask[:, None] & col_mask[None, :])


def _moe_down_kernel(  # type: ignore[no-untyped-def]
    a_ptr,  # intermediate [T * K, I], last dim contiguous
    w_ptr,  # w2 [E, H, I], last dim contiguous
    out_ptr,  # float32 [T * K, H]
    topk_w_ptr,  # [T * K] routing weights (any float dtype)
    b_ptr,  # w2_bias [E, H], last dim contiguous (read only with HAS_BIAS)
    sorted_ids_ptr,
    block_experts_ptr,
    num_pairs,
    hidden,  # H
    inter,  # I
    a_stride,
    w_stride_e,
    w_stride_n,
    out_stride,
    b_stride_e,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    DOT_F32: tl.constexpr,
    USE_PDL: tl.constexpr = False,
    HAS_BIAS: tl.constexpr = False,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    if USE_PDL:
        gdc_wait()
        gdc_launch_dependents()
    expert = tl.load(block_experts_ptr + pid_m)
    if expert < 0:
        return
    act_dtype = a_ptr.dtype.element_ty
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    pair = tl.load(sorted_ids_ptr + rows)
    row_mask = pair < num_pairs
    pair64 = pair.to(tl.int64)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < hidden
    rk = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + pair64[:, None] * a_stride + rk[None, :]
    w_ptrs = w_ptr + expert.to(tl.int64) * w_stride_e + cols[None, :] * w_stride_n + rk[:, None]
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, inter, BLOCK_K):
        k_mask = (k0 + rk) < inter
        a = tl.load(a_ptrs, mask=row_mask[:, None] & k_mask[None, :], other=0.0)
        w = tl.load(w_ptrs, mask=k_mask[:, None] & col_mask[None, :], other=0.0)
        if DOT_F32:
            acc = tl.dot(a.to(tl.float32), w.to(tl.float32), acc, input_precision="ieee")
        else:
            acc = tl.dot(a, w, acc)
        a_ptrs += BLOCK_K
        w_ptrs += BLOCK_K
    if HAS_BIAS:
        b_row = b_ptr + expert.to(tl.int64) * b_stride_e
        acc += tl.load(b_row + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    weight = tl.load(topk_w_ptr + pair64, mask=row_mask, other=0.0).to(tl.float32)
    y = acc.to(act_dtype).to(tl.float32) * weight[:, None]  # the projection rounds, then scales
    out_ptrs = out_ptr + pair64[:, None] * out_stride + cols[None, :]
    tl.store(out_ptrs, y, mask=row_mask[:, None] & col_mask[None, :])


@functools.cache
def _kernels(interpret: bool) -> SimpleNamespace:
    return SimpleNamespace(
        gate_up=decorate(_moe_gate_up_kernel, interpret),
        down=decorate(_moe_down_kernel, interpret),
    )


def jit_kernels() -> SimpleNamespace:
    return _kernels(False)


def takes(hidden: torch.Tensor, *weights: torch.Tensor | None) -> bool:
    """Whether the kernels take this call: GPU tensors (or the interpreter), one device, one
    activation dtype, weights and biases whose last dim is contiguous."""
    if not (hidden.is_cuda or interpreting()):
        return False
    given = [w for w in weights if w is not None]
    if any(w.device != hidden.device or w.dtype != hidden.dtype for w in given):
        return False
    return all(w.stride(-1) == 1 for w in given)


def _activation_args(activation: MoEActivation) -> tuple[int, float, float]:
    """(the kernels' ACTIVATION code, alpha, limit)."""
    if isinstance(activation, ClampedSwiGLU):
        return ACT_CLAMPED_SWIGLU, activation.alpha, activation.limit
    return ACT_SILU_GLU, 0.0, 0.0


def fused_moe(
    hidden: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    *,
    activation: MoEActivation = SILU_GLU,
    w13_bias: torch.Tensor | None = None,
    w2_bias: torch.Tensor | None = None,
    target: TritonTarget | None = None,
    config: MoEConfig | None = None,
) -> torch.Tensor:
    """See `hallm.platforms.ops.FusedMoEOp`: hidden [T, H], topk_weights [T, K], topk_ids [T, K],
    w13 [E, 2I, H], w2 [E, H, I], biases [E, 2I] / [E, H] -> [T, H]. Calls the kernels cannot
    take (CPU tensors outside the interpreter, mixed dtypes, strided weights) run the reference.
    `config` overrides the tile shape `moe_config` picks (for tuning sweeps)."""
    if not takes(hidden, w13, w2, w13_bias, w2_bias):
        from hallm.ops.reference_ops import fused_moe as reference

        return reference(
            hidden,
            topk_weights,
            topk_ids,
            w13,
            w2,
            activation=activation,
            w13_bias=w13_bias,
            w2_bias=w2_bias,
        )
    t, h = hidden.shape
    top_k = topk_ids.shape[1]
    e, two_i, _ = w13.shape
    inter = two_i // 2
    if t == 0:
        return torch.empty_like(hidden)
    x = hidden if hidden.stride(-1) == 1 else hidden.contiguous()
    num_pairs = t * top_k
    cfg = config or moe_config(num_pairs, e, hidden.dtype, target)
    plan = align_by_expert(topk_ids, e, cfg.block_m)
    k = _kernels(interpreting())
    dot_f32 = hidden.dtype == torch.float32 or interpreting()
    pdl = pdl_launch(target)
    act_code, alpha, limit = _activation_args(activation)
    b13 = w13 if w13_bias is None else w13_bias  # a placeholder pointer when there is no bias
    b2 = w2 if w2_bias is None else w2_bias
    act = torch.empty((num_pairs, inter), dtype=hidden.dtype, device=hidden.device)
    k.gate_up[(plan.num_blocks, triton.cdiv(inter, cfg.block_n))](
        x,
        w13,
        act,
        b13,
        plan.sorted_ids,
        plan.block_experts,
        num_pairs,
        inter,
        h,
        x.stride(0),
        w13.stride(0),
        w13.stride(1),
        act.stride(0),
        b13.stride(0),
        alpha,
        limit,
        TOP_K=top_k,
        **tiles(cfg),
        DOT_F32=dot_f32,
        HAS_BIAS=w13_bias is not None,
        ACTIVATION=act_code,
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
        **pdl,
    )
    partial = torch.empty((num_pairs, h), dtype=torch.float32, device=hidden.device)
    k.down[(plan.num_blocks, triton.cdiv(h, cfg.block_n))](
        act,
        w2,
        partial,
        topk_weights.reshape(-1).contiguous(),
        b2,
        plan.sorted_ids,
        plan.block_experts,
        num_pairs,
        h,
        inter,
        act.stride(0),
        w2.stride(0),
        w2.stride(1),
        partial.stride(0),
        b2.stride(0),
        **tiles(cfg),
        DOT_F32=dot_f32,
        HAS_BIAS=w2_bias is not None,
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
        **pdl,
    )
    return partial.view(t, top_k, h).sum(dim=1).to(hidden.dtype)


def tiles(cfg: MoEConfig) -> dict[str, int]:
    """The tile shape as the kernels' BLOCK_* constexprs."""
    return {"BLOCK_M": cfg.block_m, "BLOCK_N": cfg.block_n, "BLOCK_K": cfg.block_k}
