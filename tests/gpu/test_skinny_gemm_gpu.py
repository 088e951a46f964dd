"""hallm.ops.triton.skinny_gemm compiled and run on a real GPU (tests/gpu/run_all.sh kernels).

Skipped without a CUDA device (CI runs the same kernel in the interpreter). The projections of
Qwen2.5-0.5B and Llama-3.1-8B at 1 to 64 rows against an fp32 `F.linear` of the same operands,
in both 16-bit dtypes, with the configuration the launcher picks (split-K where it splits), and
a CUDA graph of split-K launches replayed with new inputs (the counters must reset each time).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

pytestmark = pytest.mark.skipif(
    torch.version.cuda is None or not torch.cuda.is_available(), reason="needs an NVIDIA GPU"
)

# (N, K, bias, gated): Qwen2.5-0.5B qkv, o, gate/up, down, lm_head; Llama-3.1-8B o, down
SHAPES = [
    (1152, 896, True, False),
    (896, 896, False, False),
    (4864, 896, False, True),
    (896, 4864, False, False),
    (151936, 896, False, False),
    (4096, 4096, False, False),
    (4096, 14336, False, False),
]


def _reference(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, gated: bool) -> torch.Tensor:
    y = F.linear(x.float(), w.float(), b.float() if b is not None else None).to(x.dtype)
    if not gated:
        return y
    gate, up = y.chunk(2, dim=-1)
    return (F.silu(gate.float()).to(x.dtype).float() * up.float()).to(x.dtype)


@pytest.mark.parametrize("rows", [1, 7, 16, 33, 64])
@pytest.mark.parametrize(
    "shape", SHAPES, ids=lambda s: f"n{s[0]}-k{s[1]}{'-bias' if s[2] else ''}{'-gated' if s[3] else ''}"
)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_projection_matches_fp32_reference(dtype: torch.dtype, shape, rows: int) -> None:  # type: ignore[no-untyped-def]
    from hallm.ops.triton.skinny_gemm import skinny_linear

    n, k, bias, gated = shape
    gen = torch.Generator(device="cuda").manual_seed(rows)
    w = torch.randn((2 * n if gated else n), k, device="cuda", dtype=dtype, generator=gen) * k**-0.5
    b = torch.randn(w.shape[0], device="cuda", dtype=dtype, generator=gen) if bias else None
    x = torch.randn(rows, k, device="cuda", dtype=dtype, generator=gen)
    got = skinny_linear(x, w, b, gated=gated)
    torch.testing.assert_close(got, _reference(x, w, b, gated), atol=2e-2, rtol=1.6e-2)


def test_split_k_in_a_cuda_graph_replays_with_new_inputs() -> None:
    from hallm.ops.triton.skinny_gemm import counters_for, skinny_config, skinny_linear

    n, k = 896, 4864
    assert skinny_config(1, n, k).split_k > 1
    w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * k**-0.5
    x = torch.zeros(1, k, device="cuda", dtype=torch.bfloat16)
    counters = counters_for(n, "cuda")
    skinny_linear(x, w, counters=counters)  # warm up (compile) outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = skinny_linear(x, w, counters=counters)
    for seed in range(4):
        x.copy_(torch.randn(1, k, generator=torch.Generator().manual_seed(seed)).to(x))
        graph.replay()
        torch.cuda.synchronize()
        torch.testing.assert_close(out, _reference(x, w, None, False), atol=2e-2, rtol=1.6e-2)
    assert not counters.any()
