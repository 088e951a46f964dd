"""hallm.ops.triton.skinny_gemm in the interpreter against F.linear and the GatedMLP it serves."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton")

from hallm.core.layers.mlp import GatedMLP

# float32: summation order only; bf16: one unit in the last place of the rounded output
TOL = {torch.float32: dict(atol=1e-4, rtol=1e-4), torch.bfloat16: dict(atol=2e-2, rtol=1.6e-2)}


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize(
    ("m", "n", "k", "split_k"),
    [
        (1, 40, 96, 1),  # a partial column block, K inside one tile
        (3, 33, 300, 1),  # partial K tile
        (5, 20, 1100, 4),  # split K with a ragged last split; the last program merges
        (17, 24, 64, 1),  # 32-row tile
    ],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_linear_matches_f_linear(
    m: int, n: int, k: int, split_k: int, bias: bool, dtype: torch.dtype
) -> None:
    from hallm.ops.triton.skinny_gemm import SkinnyConfig, counters_for, skinny_linear

    torch.manual_seed(m * 100 + n)
    x = torch.randn(m, k, dtype=dtype)
    w = torch.randn(n, k, dtype=dtype) / k**0.5
    b = torch.randn(n, dtype=dtype) if bias else None
    block_m = max(16, 1 << (m - 1).bit_length())
    cfg = SkinnyConfig(block_m=block_m, block_n=16, block_k=128 if split_k > 1 else 64, split_k=split_k)
    counters = counters_for(n, "cpu")
    want = F.linear(x.float(), w.float(), b.float() if b is not None else None).to(dtype)
    for _ in range(2):  # a second launch reuses the counters the first one left at zero
        got = skinny_linear(x, w, b, counters=counters, config=cfg)
        torch.testing.assert_close(got, want, **TOL[dtype])
    assert not counters.any()


def test_strided_rows_and_auto_config() -> None:
    from hallm.ops.triton.skinny_gemm import skinny_linear

    torch.manual_seed(3)
    xs = torch.randn(2, 2 * 700)
    x = xs[:, :700]  # row stride 1400
    w = torch.randn(30, 700) / 700**0.5
    torch.testing.assert_close(skinny_linear(x, w), F.linear(x, w), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gated_matches_gated_mlp(bias: bool, dtype: torch.dtype) -> None:
    from hallm.ops.triton.skinny_gemm import skinny_linear

    torch.manual_seed(4)
    mlp = GatedMLP(48, 40, "silu", bias=bias).to(dtype)
    x = torch.randn(3, 48, dtype=dtype)
    gate, up = F.linear(x, mlp.gate_up_proj.weight, mlp.gate_up_proj.bias).split(40, dim=-1)
    want = F.silu(gate) * up  # the tensor GatedMLP feeds down_proj
    got = skinny_linear(x, mlp.gate_up_proj.weight, mlp.gate_up_proj.bias, gated=True)
    torch.testing.assert_close(got, want, **TOL[dtype])


def test_bad_input_says_what_to_do() -> None:
    from hallm.ops.triton.skinny_gemm import MAX_ROWS, skinny_linear

    with pytest.raises(ValueError, match="at most"):
        skinny_linear(torch.zeros(MAX_ROWS + 1, 8), torch.zeros(4, 8))
    with pytest.raises(ValueError, match="contiguous with 8 columns"):
        skinny_linear(torch.zeros(2, 8), torch.zeros(4, 9))


def test_gated_never_splits_k() -> None:
    """A gate/up whose column blocks are too few to fill the GPU would split K if it were plain;
    the gated epilogue needs whole sums, so the automatic config keeps one split."""
    from hallm.ops.triton.skinny_gemm import skinny_config, skinny_linear

    assert skinny_config(1, 40, 2048).split_k > 1
    assert skinny_config(1, 40, 2048, gated=True).split_k == 1
    torch.manual_seed(5)
    x = torch.randn(1, 2048)
    w = torch.randn(80, 2048) / 2048**0.5
    gate, up = F.linear(x, w).split(40, dim=-1)
    torch.testing.assert_close(skinny_linear(x, w, gated=True), F.silu(gate) * up, atol=1e-4, rtol=1e-4)
