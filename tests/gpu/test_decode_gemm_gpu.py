"""hallm.ops.triton.decode_gemm compiled and run on a real GPU (tests/gpu/run_all.sh linear-decode).

Skipped without a CUDA device (CI runs the same kernel in the interpreter). Llama-3.1-8B's
projections (qkv, o, gate/up, down) at 128, 192 and 256 rows against an fp32 `F.linear` of the
same operands, with the configuration the launcher picks for this GPU; each work split (none,
split-K, stream-K) by pointers and by TMA descriptors, whose sums must not depend on which
program finishes last (two launches agree bit for bit); float16 with a bias (Qwen2.5-0.5B's
qkv); and CUDA graphs of split-K and stream-K launches replayed with new inputs (the counters
must reset each time).
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.nn.functional as F

pytestmark = pytest.mark.skipif(
    torch.version.cuda is None or not torch.cuda.is_available(), reason="needs an NVIDIA GPU"
)

# (N, K): Llama-3.1-8B's qkv, o, gate/up (stacked), down
LLAMA = [(6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336)]
TOL: dict[str, Any] = dict(atol=2e-2, rtol=1.6e-2)


def _target() -> Any:
    """This GPU as hallm-cuda describes it to its launches: SMs, opt-in shared memory, PDL."""
    from hallm_cuda.platform import CudaPlatform

    return CudaPlatform().triton_target()


def _operands(
    n: int, k: int, rows: int, dtype: torch.dtype = torch.bfloat16, bias: bool = False, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    gen = torch.Generator(device="cuda").manual_seed(seed)
    w = torch.randn(n, k, device="cuda", dtype=dtype, generator=gen) * k**-0.5
    b = torch.randn(n, device="cuda", dtype=dtype, generator=gen) if bias else None
    x = torch.randn(rows, k, device="cuda", dtype=dtype, generator=gen)
    return x, w, b


def _reference(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    return F.linear(x.float(), w.float(), b.float() if b is not None else None).to(x.dtype)


@pytest.mark.parametrize("rows", [128, 192, 256])
@pytest.mark.parametrize("shape", LLAMA, ids=lambda s: f"n{s[0]}-k{s[1]}")
def test_llama_projection_matches_fp32_reference(shape: tuple[int, int], rows: int) -> None:
    from hallm.ops.triton.decode_gemm import decode_linear

    x, w, _ = _operands(*shape, rows, seed=rows)
    torch.testing.assert_close(decode_linear(x, w, target=_target()), _reference(x, w, None), **TOL)


@pytest.mark.parametrize("tma", [False, True], ids=["pointers", "tma"])
@pytest.mark.parametrize("split", ["none", "split_k4", "stream_k"])
def test_work_splits_match_and_are_deterministic(split: str, tma: bool) -> None:
    """Llama's o projection (32 column blocks of 128) at 192 rows, each way of sharing it."""
    from hallm.ops.triton.decode_gemm import DecodeGemmConfig, decode_linear

    cfg = DecodeGemmConfig(
        tma=tma, split_k=4 if split == "split_k4" else 1, stream_k=split == "stream_k", num_stages=3
    )
    x, w, _ = _operands(4096, 4096, 192, seed=1)
    first = decode_linear(x, w, config=cfg, target=_target())
    torch.testing.assert_close(first, _reference(x, w, None), **TOL)
    assert torch.equal(decode_linear(x, w, config=cfg, target=_target()), first)


def test_float16_with_bias() -> None:
    """Qwen2.5-0.5B's qkv (bias) at 100 rows: a partial last chunk, shipped configuration."""
    from hallm.ops.triton.decode_gemm import decode_linear

    x, w, b = _operands(1152, 896, 100, dtype=torch.float16, bias=True, seed=2)
    torch.testing.assert_close(decode_linear(x, w, b, target=_target()), _reference(x, w, b), **TOL)


@pytest.mark.parametrize(
    "shape,cfg",
    [
        ((4096, 14336), dict(split_k=4)),  # down, split-K
        ((28672, 4096), dict(stream_k=True)),  # gate/up, stream-K (ranges across column blocks)
        ((6144, 4096), dict(stream_k=True, tma=True)),
    ],
    ids=["down-split_k4", "gate_up-stream_k", "qkv-stream_k-tma"],
)
def test_cuda_graph_replays_with_new_inputs(shape: tuple[int, int], cfg: dict[str, Any]) -> None:
    from hallm.ops.triton.decode_gemm import DecodeGemmConfig, counters_for, decode_linear

    n, k = shape
    config = DecodeGemmConfig(num_stages=3, **cfg)
    x, w, _ = _operands(n, k, 192, seed=3)
    counters = counters_for(n, "cuda")
    target = _target()
    decode_linear(x, w, config=config, counters=counters, target=target)  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = decode_linear(x, w, config=config, counters=counters, target=target)
    for seed in range(2):
        x.copy_(torch.randn(x.shape, generator=torch.Generator().manual_seed(seed)).to(x))
        graph.replay()
        torch.cuda.synchronize()
        assert not counters.any()  # the replay left them zero for the next one
        torch.testing.assert_close(out, _reference(x, w, None), **TOL)
