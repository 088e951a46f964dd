"""hallm.ops.triton.fused_moe compiled and run on a real GPU (tests/gpu/run_all.sh moe).

Skipped without a CUDA device (CI runs the same kernels in the interpreter). Qwen3-30B-A3B's
expert shapes (hidden 2048, 128 experts, top-8, intermediate 768) at decode and prefill sizes
against the reference in float32, in both 16-bit dtypes and float32, and a CUDA graph of the
whole op (align step included) replayed with new routing.
"""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.skipif(
    torch.version.cuda is None or not torch.cuda.is_available(), reason="needs an NVIDIA GPU"
)

H, E, K, INTER = 2048, 128, 8, 768


def _case(tokens: int, dtype: torch.dtype, seed: int) -> tuple[torch.Tensor, ...]:
    from hallm.ops.reference_ops import softmax_topk

    gen = torch.Generator(device="cuda").manual_seed(seed)
    hidden = torch.randn(tokens, H, device="cuda", generator=gen).to(dtype)
    w13 = (torch.randn(E, 2 * INTER, H, device="cuda", generator=gen) * H**-0.5).to(dtype)
    w2 = (torch.randn(E, H, INTER, device="cuda", generator=gen) * INTER**-0.5).to(dtype)
    weights, ids = softmax_topk(torch.randn(tokens, E, device="cuda", generator=gen), K, True)
    return hidden, weights, ids, w13, w2


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("tokens", [1, 7, 128, 600])
def test_fused_moe_matches_the_reference(tokens: int, dtype: torch.dtype) -> None:
    from hallm.ops.reference_ops import fused_moe as reference
    from hallm.ops.triton.fused_moe import fused_moe

    hidden, weights, ids, w13, w2 = _case(tokens, dtype, tokens)
    want = reference(hidden.float(), weights, ids, w13.float(), w2.float())
    got = fused_moe(hidden, weights, ids, w13, w2)
    tol = 2e-4 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(got.float(), want, atol=tol, rtol=tol)


def test_fused_moe_replays_from_a_cuda_graph() -> None:
    from hallm.ops.reference_ops import fused_moe as reference
    from hallm.ops.triton.fused_moe import fused_moe

    hidden, weights, ids, w13, w2 = _case(32, torch.bfloat16, 0)
    fused_moe(hidden, weights, ids, w13, w2)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fused_moe(hidden, weights, ids, w13, w2)
    new_hidden, new_weights, new_ids, _, _ = _case(32, torch.bfloat16, 1)
    hidden.copy_(new_hidden)
    weights.copy_(new_weights)
    ids.copy_(new_ids)
    graph.replay()
    want = reference(hidden.float(), weights, ids, w13.float(), w2.float())
    torch.testing.assert_close(out.float(), want, atol=3e-2, rtol=3e-2)
