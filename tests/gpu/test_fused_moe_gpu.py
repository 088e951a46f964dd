"""hallm.ops.triton.fused_moe compiled and run on a real GPU (tests/gpu/run_all.sh moe).

Skipped without a CUDA device (CI runs the same kernels in the interpreter). Qwen3-30B-A3B's
expert shapes (hidden 2048, 128 experts, top-8, intermediate 768) and gpt-oss-20b's (hidden
2880, 32 experts, top-4, intermediate 2880, biases on both projections, the clamped SwiGLU) at
decode and prefill sizes against the reference in float32, in both 16-bit dtypes and float32,
and a CUDA graph of the whole op (align step included) replayed with new routing.
"""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.skipif(
    torch.version.cuda is None or not torch.cuda.is_available(), reason="needs an NVIDIA GPU"
)

H, E, K, INTER = 2048, 128, 8, 768
#: gpt-oss-20b's experts: hidden, experts, top-k, intermediate
OSS_H, OSS_E, OSS_K, OSS_INTER = 2880, 32, 4, 2880


def _gpt_oss_case(
    tokens: int, dtype: torch.dtype, seed: int, routing: str
) -> tuple[tuple[torch.Tensor, ...], dict]:
    """(hidden, weights, ids, w13, w2) and the op's gpt-oss options. gate/up projections of std
    ~3 (so both clamps bind), biases of std 0.5; gpt-oss's router: softmax over the top-k logits.
    `routing`: "softmax" (the router's own choice), "one expert" (every token to experts
    0..K-1), "empty experts" (only experts 0..2K-1 ever chosen)."""
    from hallm.platforms.ops import ClampedSwiGLU

    gen = torch.Generator(device="cuda").manual_seed(seed)

    def randn(*shape: int, scale: float) -> torch.Tensor:
        return (torch.randn(*shape, device="cuda", generator=gen) * scale).to(dtype)

    hidden = randn(tokens, OSS_H, scale=1.0)
    w13 = randn(OSS_E, 2 * OSS_INTER, OSS_H, scale=3 * OSS_H**-0.5)
    w2 = randn(OSS_E, OSS_H, OSS_INTER, scale=OSS_INTER**-0.5)
    opts = {
        "activation": ClampedSwiGLU(alpha=1.702, limit=7.0),
        "w13_bias": randn(OSS_E, 2 * OSS_INTER, scale=0.5),
        "w2_bias": randn(OSS_E, OSS_H, scale=0.5),
    }
    logits = torch.randn(tokens, OSS_E, device="cuda", generator=gen)
    if routing == "one expert":
        logits[:, :OSS_K] += 100.0
    elif routing == "empty experts":
        logits[:, 2 * OSS_K :] -= 100.0
    top, ids = torch.topk(logits, OSS_K, dim=-1)
    return (hidden, torch.softmax(top, dim=-1).to(dtype), ids, w13, w2), opts


def _float(opts: dict) -> dict:
    return {k: v.float() if isinstance(v, torch.Tensor) else v for k, v in opts.items()}


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


@pytest.mark.parametrize("routing", ["softmax", "one expert", "empty experts"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("tokens", [1, 7, 600])
def test_gpt_oss_experts_match_the_reference(tokens: int, dtype: torch.dtype, routing: str) -> None:
    """Biases and the clamped SwiGLU; intermediate values reach ~50, so errors are measured
    against the output's scale."""
    from hallm.ops.reference_ops import fused_moe as reference
    from hallm.ops.triton.fused_moe import fused_moe

    (hidden, weights, ids, w13, w2), opts = _gpt_oss_case(tokens, dtype, tokens, routing)
    want = reference(hidden.float(), weights.float(), ids, w13.float(), w2.float(), **_float(opts))
    got = fused_moe(hidden, weights, ids, w13, w2, **opts)
    scale = float(want.abs().max())
    tol = 2e-4 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(got.float() / scale, want / scale, atol=tol, rtol=tol)


def test_gpt_oss_experts_replay_from_a_cuda_graph() -> None:
    from hallm.ops.reference_ops import fused_moe as reference
    from hallm.ops.triton.fused_moe import fused_moe

    (hidden, weights, ids, w13, w2), opts = _gpt_oss_case(16, torch.bfloat16, 0, "softmax")
    fused_moe(hidden, weights, ids, w13, w2, **opts)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fused_moe(hidden, weights, ids, w13, w2, **opts)
    (new_hidden, new_weights, new_ids, _, _), _ = _gpt_oss_case(16, torch.bfloat16, 1, "softmax")
    hidden.copy_(new_hidden)
    weights.copy_(new_weights)
    ids.copy_(new_ids)
    graph.replay()
    want = reference(hidden.float(), weights.float(), ids, w13.float(), w2.float(), **_float(opts))
    scale = float(want.abs().max())
    torch.testing.assert_close(out.float() / scale, want / scale, atol=3e-2, rtol=3e-2)
