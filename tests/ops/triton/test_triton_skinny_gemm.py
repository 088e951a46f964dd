"""hallm.ops.triton.skinny_gemm in the interpreter against F.linear, and its RMSNorm prologue and
rotary epilogue against the kernels they replace."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton")

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


def test_bad_input_says_what_to_do() -> None:
    from hallm.ops.triton.skinny_gemm import MAX_ROWS, skinny_linear

    with pytest.raises(ValueError, match="at most"):
        skinny_linear(torch.zeros(MAX_ROWS + 1, 8), torch.zeros(4, 8))
    with pytest.raises(ValueError, match="contiguous with 8 columns"):
        skinny_linear(torch.zeros(2, 8), torch.zeros(4, 9))


def test_paired_launches_split_to_one_tile() -> None:
    """A rotary launch splits K to one tile per program (its weights load before the dependency
    wait), with one pipeline stage when that covers K. The split rotary launch matches."""
    from hallm.ops.triton.fused import rotary
    from hallm.ops.triton.skinny_gemm import RotaryEpilogue, skinny_config, skinny_linear

    assert skinny_config(1, 1152, 896).split_k == 1
    one_tile = skinny_config(1, 1152, 896, paired=True)
    assert (one_tile.split_k, one_tile.num_stages) == (4, 1)  # 896 = 3.5 tiles of 256
    assert skinny_config(1, 40, 2048, paired=True).split_k == 8
    several = skinny_config(1, 40, 8192, paired=True)
    assert (several.split_k, several.num_stages) == (8, 3)  # at most 8: 4 tiles each
    torch.manual_seed(5)
    d, k = 32, 2048
    x = torch.randn(1, k)
    w = torch.randn(3 * d, k) / k**0.5  # one q, one k and one v head
    positions = torch.tensor([7])
    inv_freq = 1.0 / (10000 ** (torch.arange(0, d, 2).float() / d))
    q, kk, v = F.linear(x, w).split(d, dim=-1)
    want_q, want_k = rotary(positions, q.view(1, 1, d), kk.view(1, 1, d), inv_freq, 1.0)
    got = skinny_linear(x, w, rotary=RotaryEpilogue(positions, inv_freq, 1.0, d, 2))
    torch.testing.assert_close(
        got, torch.cat([want_q.view(1, d), want_k.view(1, d), v], dim=-1), atol=1e-4, rtol=1e-4
    )


def _config(m: int, split_k: int, block_k: int = 64):  # type: ignore[no-untyped-def]
    from hallm.ops.triton.skinny_gemm import SkinnyConfig

    return SkinnyConfig(
        block_m=max(16, 1 << (m - 1).bit_length()), block_n=16, block_k=block_k, split_k=split_k
    )


@pytest.mark.parametrize("residual", [False, True])
@pytest.mark.parametrize(("m", "k", "split_k"), [(1, 200, 1), (3, 300, 3), (17, 64, 1)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_norm_prologue_matches_rms_norm_then_linear(
    m: int, k: int, split_k: int, residual: bool, dtype: torch.dtype
) -> None:
    """RMSNorm (with the residual add) folded into the projection: the same rows reach the
    product as from the RMSNorm kernel, and the residual stream comes back exactly."""
    from hallm.ops.triton.fused import rms_norm
    from hallm.ops.triton.skinny_gemm import RMSNormPrologue, counters_for, skinny_linear

    torch.manual_seed(m * 10 + k)
    n = 40
    x = torch.randn(m, k, dtype=dtype)
    r = torch.randn(m, k, dtype=dtype) if residual else None
    norm_w = torch.randn(k, dtype=dtype) * 0.2 + 1.0
    w = torch.randn(n, k, dtype=dtype) / k**0.5
    b = torch.randn(n, dtype=dtype)
    normed = rms_norm(x, norm_w, 1e-6, r)
    normed, want_res = normed if r is not None else (normed, None)
    want = skinny_linear(normed, w, b, config=_config(m, 1))
    counters = counters_for(n, "cpu")
    for _ in range(2):  # the split launch leaves its counters at zero for the next
        got = skinny_linear(
            x,
            w,
            b,
            norm=RMSNormPrologue(norm_w, 1e-6, r),
            counters=counters,
            config=_config(m, split_k),
        )
        if r is not None:
            got, got_res = got
            torch.testing.assert_close(got_res, want_res, atol=0, rtol=0)
        torch.testing.assert_close(got, want, **TOL[dtype])
    assert not counters.any()


@pytest.mark.parametrize(("m", "split_k"), [(1, 1), (4, 2), (18, 3)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rotary_epilogue_matches_linear_then_rotary(m: int, split_k: int, dtype: torch.dtype) -> None:
    """qkv projection + rotary of q and k (not v) in one launch, against F.linear + the rotary
    kernel the fused layers use."""
    from hallm.ops.triton.fused import rotary
    from hallm.ops.triton.skinny_gemm import RotaryEpilogue, skinny_linear

    torch.manual_seed(m)
    hq, hk, d, k = 4, 2, 64, 160
    w = torch.randn((hq + 2 * hk) * d, k, dtype=dtype) / k**0.5
    b = torch.randn(w.shape[0], dtype=dtype)
    x = torch.randn(m, k, dtype=dtype)
    positions = torch.randint(0, 5000, (m,))
    inv_freq = 1.0 / (10000 ** (torch.arange(0, d, 2).float() / d))
    qkv = F.linear(x.float(), w.float(), b.float()).to(dtype)
    q, kk, v = qkv.split([hq * d, hk * d, hk * d], dim=-1)
    want_q, want_k = rotary(positions, q.view(m, hq, d), kk.view(m, hk, d), inv_freq, 0.9)
    got = skinny_linear(
        x, w, b, rotary=RotaryEpilogue(positions, inv_freq, 0.9, d, hq + hk), config=_config(m, split_k, 32)
    )
    got_q, got_k, got_v = got.split([hq * d, hk * d, hk * d], dim=-1)
    # bf16: the projection rounds to the same value up to summation order, then one unit
    torch.testing.assert_close(got_q.view(m, hq, d), want_q, **TOL[dtype])
    torch.testing.assert_close(got_k.view(m, hk, d), want_k, **TOL[dtype])
    torch.testing.assert_close(got_v, v, **TOL[dtype])


def test_epilogue_input_checks() -> None:
    from hallm.ops.triton.skinny_gemm import RMSNormPrologue, RotaryEpilogue, skinny_linear

    x, w = torch.zeros(2, 32), torch.zeros(96, 32)
    inv = torch.ones(12)
    with pytest.raises(ValueError, match="multiple of 32"):
        skinny_linear(x, w, rotary=RotaryEpilogue(torch.zeros(2, dtype=torch.long), inv, 1.0, 24, 3))
    with pytest.raises(ValueError, match="float32 \\[16\\]"):
        skinny_linear(x, w, rotary=RotaryEpilogue(torch.zeros(2, dtype=torch.long), inv, 1.0, 32, 3))
    with pytest.raises(ValueError, match="residual"):
        skinny_linear(x, w, norm=RMSNormPrologue(torch.ones(32), 1e-6, torch.zeros(3, 32)))
    with pytest.raises(ValueError, match="norm weight"):
        skinny_linear(x, w, norm=RMSNormPrologue(torch.ones(31), 1e-6))
