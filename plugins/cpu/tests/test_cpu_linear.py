"""CpuLinear computes what nn.Linear computes, on every path it may take."""

from __future__ import annotations

import pytest
import torch
from hallm_cpu.linear import BF16_GEMV_ROWS, WIDE_OUTPUT, CpuLinear, optimize_linears
from torch import nn


@pytest.mark.parametrize("out_features", [64, WIDE_OUTPUT])
@pytest.mark.parametrize("rows", [1, BF16_GEMV_ROWS + 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("native_bf16", [False, True])
def test_cpu_linear_matches_nn_linear(
    out_features: int, rows: int, dtype: torch.dtype, bias: bool, native_bf16: bool
) -> None:
    torch.manual_seed(0)
    ref = nn.Linear(48, out_features, bias=bias).to(dtype)
    fast = CpuLinear(ref, native_bf16)
    x = torch.randn(rows, 48, dtype=dtype)
    # The oracle: the same product in fp32 from the same (possibly bf16) values.
    expected = torch.nn.functional.linear(
        x.float(), ref.weight.float(), None if ref.bias is None else ref.bias.float()
    )
    got = fast(x)
    assert got.dtype == dtype and got.shape == (rows, out_features)
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(got.float(), expected, atol=tol, rtol=tol)
    assert fast.transposed == (dtype == torch.float32 and out_features >= WIDE_OUTPUT)


def test_optimize_linears_replaces_every_linear_and_keeps_outputs() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Sequential(nn.Linear(32, WIDE_OUTPUT, bias=False)))
    x = torch.randn(3, 16)
    before = model(x)
    optimize_linears(model)
    assert not any(type(m) is nn.Linear for m in model.modules())
    torch.testing.assert_close(model(x), before, atol=1e-5, rtol=1e-5)
