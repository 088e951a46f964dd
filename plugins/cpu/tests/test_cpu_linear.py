"""CpuLinear computes what nn.Linear computes, on every path it may take."""

from __future__ import annotations

import pytest
import torch
from hallm_cpu.linear import BF16_GEMV_ROWS, WIDE_OUTPUT, CpuLinear
from torch import nn

from hallm.platforms.ops import LinearWeights


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
    fast = CpuLinear(
        LinearWeights(ref.weight.detach(), None if ref.bias is None else ref.bias.detach()),
        native_bf16,
        use_native=False,
    )
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


def test_the_transposed_layout_replaces_the_layers_weight() -> None:
    """A kernel that keeps W^T tells the layer to drop its [N, K] copy; the layer still computes
    what it computed (the core's Linear, prepared with the CPU table's entry)."""
    from hallm_cpu.linear import linear_op

    from hallm.core.layers.linear import Linear
    from hallm.core.layers.op_context import building_with
    from hallm.platforms.ops import OpTable

    torch.manual_seed(0)
    with building_with(OpTable(linear=linear_op(use_native=False))):
        layer = Linear(16, WIDE_OUTPUT, bias=False)
    torch.nn.init.normal_(layer.weight)
    x = torch.randn(3, 16)
    before = torch.nn.functional.linear(x, layer.weight)
    layer.prepare_kernels()
    assert layer.weight is None
    torch.testing.assert_close(layer(x), before, atol=1e-5, rtol=1e-5)
