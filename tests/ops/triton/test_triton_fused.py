"""hallm.ops.triton.fused in the interpreter against the op table's references (hallm.ops.reference_ops)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton")

from hallm.core.layers.norm import RMSNorm
from hallm.ops.reference_ops import apply_rotary

# float32: rounding only; bf16: one unit in the last place (the kernels round once, PyTorch per op)
TOL = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.bfloat16: dict(atol=2e-2, rtol=1.6e-2)}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rms_norm_with_and_without_residual(dtype: torch.dtype) -> None:
    from hallm.ops.triton.fused import rms_norm

    torch.manual_seed(0)
    norm = RMSNorm(72, 1e-6).to(dtype)
    norm.weight.data.normal_(1.0, 0.2)
    x, r = torch.randn(5, 72, dtype=dtype), torch.randn(5, 72, dtype=dtype)
    torch.testing.assert_close(rms_norm(x, norm.weight, 1e-6), norm(x), **TOL[dtype])
    out, res = rms_norm(x, norm.weight, 1e-6, r)
    want_out, want_res = norm(x, r)
    torch.testing.assert_close(res, want_res, **TOL[dtype])
    torch.testing.assert_close(out, want_out, **TOL[dtype])
    # per-head norm (Qwen3's q/k norm) of a strided [T, H, D] view
    qkv = torch.randn(3, 4 * 16 + 8, dtype=dtype)
    q = qkv[:, :64].view(3, 4, 16)
    head_norm = RMSNorm(16, 1e-6).to(dtype)
    torch.testing.assert_close(rms_norm(q, head_norm.weight, 1e-6), head_norm(q), **TOL[dtype])


@pytest.mark.parametrize("rotary_dim", [16, 8])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rotary_full_and_partial(dtype: torch.dtype, rotary_dim: int) -> None:
    from hallm.ops.triton.fused import rotary

    torch.manual_seed(1)
    qkv = torch.randn(4, 6 * 16 + 2 * 2 * 16, dtype=dtype)  # a fused projection: strided views
    q, k = qkv[:, :96].view(4, 6, 16), qkv[:, 96:128].view(4, 2, 16)
    positions = torch.tensor([0, 5, 17, 3000])
    inv_freq = 1.0 / (10000 ** (torch.arange(0, rotary_dim, 2).float() / rotary_dim))
    freqs = positions.float()[:, None] * inv_freq[None]
    cos = (freqs.cos() * 0.9).to(dtype)[:, None]
    sin = (freqs.sin() * 0.9).to(dtype)[:, None]
    got_q, got_k = rotary(positions, q, k, inv_freq, 0.9)
    torch.testing.assert_close(got_q, apply_rotary(q, cos, sin), **TOL[dtype])
    torch.testing.assert_close(got_k, apply_rotary(k, cos, sin), **TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_silu_and_mul(dtype: torch.dtype) -> None:
    from hallm.ops.triton.fused import silu_and_mul

    x = torch.randn(3, 2 * 1100, dtype=dtype)  # two column blocks, the second partial
    torch.testing.assert_close(silu_and_mul(x), F.silu(x[:, :1100]) * x[:, 1100:], **TOL[dtype])
