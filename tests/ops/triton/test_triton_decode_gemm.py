"""hallm.ops.triton.decode_gemm in the interpreter against an fp32 F.linear: one to four row
chunks (the last one partial), ragged N and K, split-K and stream-K (ranges across column
blocks), operands by pointers and by TMA descriptors, with and without bias, a second launch
on the counters the first left; the shipped configuration's choices; bad input."""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton")

# bf16 output: one unit in the last place (the interpreter truncates where a GPU rounds)
TOL: dict[str, Any] = dict(atol=2e-2, rtol=1.6e-2)
#: An H100/H200: 132 SMs, PDL, 227 KB of shared memory per block (opt-in).
H100 = dict(num_sms=132, pdl=True, shared_memory_bytes=227 * 1024)


def _operands(m: int, n: int, k: int, bias: bool, seed: int) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=gen).to(torch.bfloat16)
    w = (torch.randn(n, k, generator=gen) / k**0.5).to(torch.bfloat16)
    b = torch.randn(n, generator=gen).to(torch.bfloat16) if bias else None
    want = F.linear(x.float(), w.float(), b.float() if b is not None else None).to(torch.bfloat16)
    return x, w, b, want


# (rows, N, K, config, SMs of the target, bias)
CASES = {
    # one 32-row chunk, N = 2.5 column blocks
    "m17": (17, 40, 96, dict(block_m=32, block_n=16, block_k=32), 132, True),
    # one chunk, ragged N and K (100 = 3 tiles + 4)
    "m64-ragged-k": (64, 33, 100, dict(block_n=16, block_k=32), 132, False),
    # two chunks (the second 36 rows), 4 ragged K tiles split 1 + 1 + 2
    "m100-split3": (100, 40, 100, dict(block_n=16, block_k=32, split_k=3), 132, True),
    # three full chunks, split-K
    "m192-split2": (192, 24, 128, dict(block_n=16, block_k=32, split_k=2), 132, False),
    # 9 column blocks x 4 tiles over 5 programs: ranges cover whole blocks and cross into others
    "stream-k-blocks-over-programs": (
        70,
        144,
        64,
        dict(block_m=32, block_n=16, block_k=16, stream_k=True),
        5,
        True,
    ),
    # 5 column blocks x 10 tiles over 7 programs: up to 3 contributors per block
    "stream-k-programs-over-blocks": (
        100,
        72,
        160,
        dict(block_n=16, block_k=16, stream_k=True),
        7,
        False,
    ),
}


@pytest.mark.parametrize("tma", [False, True], ids=["pointers", "tma"])
@pytest.mark.parametrize("case", list(CASES))
def test_matches_f_linear(case: str, tma: bool) -> None:
    from hallm.ops.triton.decode_gemm import DecodeGemmConfig, counters_for, decode_linear
    from hallm.ops.triton.target import TritonTarget

    m, n, k, kwargs, sms, bias = CASES[case]
    cfg = DecodeGemmConfig(**kwargs, tma=tma)
    x, w, b, want = _operands(m, n, k, bias, seed=m + n)
    counters = counters_for(n, "cpu")
    shared = cfg.split_k > 1 or cfg.stream_k
    for _ in range(2 if shared else 1):  # a second launch on the counters the first left
        got = decode_linear(x, w, b, config=cfg, counters=counters, target=TritonTarget(num_sms=sms))
        torch.testing.assert_close(got, want, **TOL)
    assert not counters.any()


def test_auto_config_strided_and_unaligned_rows() -> None:
    """The shipped configuration; rows with a stride; a TMA config on rows no descriptor can
    address (an odd offset) falls back to pointers."""
    from hallm.ops.triton.decode_gemm import DecodeGemmConfig, decode_linear

    x, w, _, want = _operands(40, 48, 64, False, seed=1)
    wide = torch.zeros(40, 200, dtype=torch.bfloat16)
    wide[:, 1:65] = x
    wide[:, 96:160] = x
    torch.testing.assert_close(decode_linear(wide[:, 96:160], w), want, **TOL)
    cfg = DecodeGemmConfig(block_n=16, block_k=32, tma=True)
    torch.testing.assert_close(decode_linear(wide[:, 1:65], w, config=cfg), want, **TOL)


def test_shipped_configs_fit_and_fill_an_h100() -> None:
    """Llama-3.1-8B's projections at 128-256 rows on an H100: the stages fit its shared memory;
    o and down (32 column blocks of 128) split K over at least 96 SMs; gate/up (224 column
    blocks: 1.7 waves) runs stream-K, one program per SM; whole waves are not split."""
    from hallm.ops.triton.decode_gemm import SHARED_RESERVE, _programs, decode_gemm_config
    from hallm.ops.triton.target import GENERIC, TritonTarget

    target = TritonTarget(**H100)
    for m in (128, 192, 256):
        for n, k in ((6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336)):
            cfg = decode_gemm_config(m, n, k, target)
            assert cfg.block_m == 64 and cfg.num_stages >= 3
            assert cfg.num_stages * cfg.stage_bytes(m) + SHARED_RESERVE <= target.shared_memory_bytes
            programs = _programs(cfg, -(-n // cfg.block_n), -(-k // cfg.block_k), target)
            assert programs >= 96, (m, n, k, cfg, programs)
            if n == 28672:
                assert cfg.stream_k and programs == target.num_sms
        # the generic target (99 KB a block): thinner tiles, at least two stages, fit
        small = decode_gemm_config(m, 4096, 4096, GENERIC)
        assert small.num_stages >= 2
        assert small.num_stages * small.stage_bytes(m) + SHARED_RESERVE <= GENERIC.shared_memory_bytes
    whole = decode_gemm_config(192, 2 * 132 * 128, 4096, target)
    assert (whole.split_k, whole.stream_k) == (1, False)


def test_bad_input_says_what_to_do() -> None:
    from hallm.ops.triton.decode_gemm import DecodeGemmConfig, decode_linear

    dt = torch.bfloat16
    x, w = torch.zeros(4, 64, dtype=dt), torch.zeros(32, 64, dtype=dt)
    with pytest.raises(ValueError, match=r"at most 256 rows, got 257; use F\.linear"):
        decode_linear(torch.zeros(257, 64, dtype=dt), w)
    with pytest.raises(ValueError, match=r"must be \[N, K\] with x's K = 64"):
        decode_linear(x, torch.zeros(32, 48, dtype=dt))
    with pytest.raises(ValueError, match=r"call weight\.contiguous\(\)"):
        decode_linear(x, torch.zeros(64, 32, dtype=dt).t())
    with pytest.raises(ValueError, match=r"use F\.linear for other dtypes"):
        decode_linear(x.float(), w.float())
    with pytest.raises(ValueError, match="bias must be"):
        decode_linear(x, w, torch.zeros(31, dtype=dt))
    split = DecodeGemmConfig(block_n=16, block_k=16, split_k=2)
    with pytest.raises(ValueError, match=r"use counters_for\(32, device\)"):
        decode_linear(x, w, config=split, counters=torch.zeros(1, dtype=torch.int32))
    with pytest.raises(ValueError, match="raise block_m"):
        decode_linear(torch.zeros(200, 64, dtype=dt), w, config=DecodeGemmConfig(block_m=16))
    with pytest.raises(ValueError, match="power of two"):
        DecodeGemmConfig(block_n=48)
