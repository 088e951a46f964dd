"""hallm.ops.triton.skinny_gemm compiled and run on a real GPU (tests/gpu/run_all.sh kernels).

Skipped without a CUDA device (CI runs the same kernel in the interpreter). The projections of
Qwen2.5-0.5B and Llama-3.1-8B at 1 to 64 rows against an fp32 `F.linear` of the same operands,
in both 16-bit dtypes, with the configuration the launcher picks (split-K where it splits), and
a CUDA graph of split-K launches replayed with new inputs (the counters must reset each time),
and a chain of Triton kernels with programmatic dependent launch on and off, which must agree
bit for bit. The fused decoder stack's launch (RMSNorm prologue, rotary epilogue) against the
kernels it replaces, and replayed from a CUDA graph.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.nn.functional as F

pytestmark = pytest.mark.skipif(
    torch.version.cuda is None or not torch.cuda.is_available(), reason="needs an NVIDIA GPU"
)

# (N, K, bias): Qwen2.5-0.5B qkv, o, gate/up, down, lm_head; Llama-3.1-8B o, down
SHAPES = [
    (1152, 896, True),
    (896, 896, False),
    (9728, 896, False),
    (896, 4864, False),
    (151936, 896, False),
    (4096, 4096, False),
    (4096, 14336, False),
]


def _reference(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    return F.linear(x.float(), w.float(), b.float() if b is not None else None).to(x.dtype)


@pytest.mark.parametrize("rows", [1, 7, 16, 33, 64])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"n{s[0]}-k{s[1]}{'-bias' if s[2] else ''}")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_projection_matches_fp32_reference(dtype: torch.dtype, shape, rows: int) -> None:  # type: ignore[no-untyped-def]
    from hallm.ops.triton.skinny_gemm import skinny_linear

    n, k, bias = shape
    gen = torch.Generator(device="cuda").manual_seed(rows)
    w = torch.randn(n, k, device="cuda", dtype=dtype, generator=gen) * k**-0.5
    b = torch.randn(n, device="cuda", dtype=dtype, generator=gen) if bias else None
    x = torch.randn(rows, k, device="cuda", dtype=dtype, generator=gen)
    got = skinny_linear(x, w, b)
    torch.testing.assert_close(got, _reference(x, w, b), atol=2e-2, rtol=1.6e-2)


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
        assert not counters.any()  # the replay left them zero for the next one
        torch.testing.assert_close(out, _reference(x, w, None), atol=2e-2, rtol=1.6e-2)


def _pdl_chain(
    x: torch.Tensor, weights: list[torch.Tensor], norm_w: torch.Tensor, target: Any
) -> torch.Tensor:
    """norm -> up projection -> down projection (split K) -> norm ..., every kernel a Triton
    launch, so with PDL each one starts while its predecessor runs."""
    from hallm.ops.triton.fused import rms_norm, silu_and_mul
    from hallm.ops.triton.skinny_gemm import skinny_linear

    h, residual = rms_norm(x, norm_w, 1e-6, torch.zeros_like(x), target)
    for up, down in zip(weights[::2], weights[1::2], strict=True):
        a = silu_and_mul(skinny_linear(h, up, target=target), target)  # [rows, 2I] -> [rows, I]
        h, residual = rms_norm(skinny_linear(a, down, target=target), norm_w, 1e-6, residual, target)
    return h


@pytest.mark.parametrize("rows", [1, 7])
def test_pdl_chain_is_bit_identical_to_plain_launches(rows: int, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """Programmatic dependent launch changes when kernels start, never what they compute: the
    same chain eagerly and replayed from a CUDA graph, launched for a target with and without
    PDL."""
    from hallm.ops.triton.runtime import pdl_launch
    from hallm.ops.triton.target import TritonTarget

    gen = torch.Generator(device="cuda").manual_seed(rows)
    hidden, inter = 896, 4864

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, device="cuda", dtype=torch.bfloat16, generator=gen)

    weights = [t * 0.03 for _ in range(3) for t in (randn(2 * inter, hidden), randn(hidden, inter))]
    norm_w = randn(hidden).abs() + 0.5
    x = randn(rows, hidden)
    results = {}
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    for pdl in ("0", "1"):
        target = TritonTarget(num_sms=sms, pdl=pdl == "1" and torch.cuda.get_device_capability()[0] >= 9)
        assert pdl_launch(target)["USE_PDL"] == target.pdl
        eager = _pdl_chain(x, weights, norm_w, target)
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            captured = _pdl_chain(x, weights, norm_w, target)
        graph.replay()
        torch.cuda.synchronize()
        results[pdl] = (eager.clone(), captured.clone())
    assert torch.equal(results["0"][0], results["1"][0])
    assert torch.equal(results["0"][1], results["1"][1])
    assert torch.equal(results["1"][0], results["1"][1])


def _norm_rotary_case(dtype: torch.dtype, rows: int, seed: int):  # type: ignore[no-untyped-def]
    """Qwen2.5-0.5B's qkv (14 + 2 + 2 heads of 64, bias) with its RMSNorm."""
    gen = torch.Generator(device="cuda").manual_seed(seed)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, device="cuda", dtype=dtype, generator=gen)

    hidden, d = 896, 64
    return dict(
        x=randn(rows, hidden),
        residual=randn(rows, hidden),
        norm_w=randn(hidden) * 0.2 + 1.0,
        w_qkv=randn(18 * d, hidden) * hidden**-0.5,
        b_qkv=randn(18 * d),
        positions=torch.randint(0, 32768, (rows,), device="cuda", generator=gen),
        inv_freq=1.0 / (1e6 ** (torch.arange(0, d, 2, device="cuda").float() / d)),
    )


@pytest.mark.parametrize("rows", [1, 7, 16])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_norm_prologue_and_rotary_epilogue_match_the_unfused_kernels(dtype: torch.dtype, rows: int) -> None:
    """What FusedDecoderStack launches against the kernels it replaces (RMSNorm with the
    residual add, an fp32 F.linear, the rotary kernel), compiled, with PDL."""
    from hallm.ops.triton.fused import rms_norm, rotary
    from hallm.ops.triton.skinny_gemm import RMSNormPrologue, RotaryEpilogue, skinny_linear

    c = _norm_rotary_case(dtype, rows, rows)
    normed, want_res = rms_norm(c["x"], c["norm_w"], 1e-6, c["residual"])
    q, k, v = _reference(normed, c["w_qkv"], c["b_qkv"]).split([14 * 64, 128, 128], dim=-1)
    want_q, want_k = rotary(c["positions"], q.view(rows, 14, 64), k.view(rows, 2, 64), c["inv_freq"], 1.0)
    got, got_res = skinny_linear(
        c["x"],
        c["w_qkv"],
        c["b_qkv"],
        norm=RMSNormPrologue(c["norm_w"], 1e-6, c["residual"]),
        rotary=RotaryEpilogue(c["positions"], c["inv_freq"], 1.0, 64, 16),
    )
    assert torch.equal(got_res, want_res)
    got_q, got_k, got_v = got.split([14 * 64, 128, 128], dim=-1)
    tol = dict(atol=3e-2, rtol=1.6e-2)
    torch.testing.assert_close(got_q.view(rows, 14, 64), want_q, **tol)
    torch.testing.assert_close(got_k.view(rows, 2, 64), want_k, **tol)
    torch.testing.assert_close(got_v, v, **tol)


def test_fused_projections_in_a_cuda_graph_replay_with_new_inputs() -> None:
    """The split-K rotary qkv launch (its counters must reset) captured once and replayed with
    new rows, positions and residuals."""
    from hallm.ops.triton.skinny_gemm import (
        RMSNormPrologue,
        RotaryEpilogue,
        counters_for,
        skinny_config,
        skinny_linear,
    )

    assert skinny_config(1, 1152, 896, paired=True).split_k > 1
    c = _norm_rotary_case(torch.bfloat16, 1, 0)
    counters = counters_for(1152, "cuda")

    def run() -> tuple[torch.Tensor, torch.Tensor]:
        return skinny_linear(  # type: ignore[return-value]
            c["x"],
            c["w_qkv"],
            c["b_qkv"],
            norm=RMSNormPrologue(c["norm_w"], 1e-6, c["residual"]),
            rotary=RotaryEpilogue(c["positions"], c["inv_freq"], 1.0, 64, 16),
            counters=counters,
        )

    run()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out, res = run()
    for seed in range(1, 4):
        new = _norm_rotary_case(torch.bfloat16, 1, seed)
        for name in ("x", "residual", "positions"):
            c[name].copy_(new[name])
        graph.replay()
        torch.cuda.synchronize()
        assert not counters.any()  # the replay left them zero for the next one
        want_out, want_res = run()
        assert torch.equal(res, want_res)
        assert torch.equal(out, want_out)
    assert not counters.any()
