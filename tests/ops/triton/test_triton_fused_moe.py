"""hallm.ops.triton.fused_moe in the interpreter against the op's reference
(hallm.ops.reference_ops.fused_moe), over routing patterns, top-k 1 and 2, token counts that
leave partial row blocks, and both activations (SiLU-and-mul without biases, gpt-oss's clamped
SwiGLU with biases on both projections); and the align step's plan itself."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from hallm.ops import reference_ops as ref
from hallm.ops.triton.fused_moe import fused_moe
from hallm.ops.triton.moe_align import align_by_expert, max_padded_rows
from hallm.ops.triton.op_table import triton_op_table
from hallm.ops.triton.target import GENERIC, amd_target
from hallm.platforms.ops import SILU_GLU, ClampedSwiGLU, MoEActivation

#: float32: summation order only; bf16: the interpreter truncates its bf16 casts (GPUs round to
#: nearest even) at each of the reference's roundings.
TOL = {torch.float32: dict(atol=2e-5, rtol=2e-5), torch.bfloat16: dict(atol=3e-2, rtol=3e-2)}
#: hidden, intermediate (not multiples of the tiles: partial column and K tiles), experts
H, INTER, E = 40, 24, 6


def _routing(pattern: str, tokens: int, top_k: int) -> torch.Tensor:
    """topk_ids [tokens, top_k], distinct experts per token."""
    rows = torch.arange(tokens)
    if pattern == "one expert":  # every token's first choice is expert 3 (its second, expert 0)
        cols = [torch.full((tokens,), 3), torch.zeros(tokens, dtype=torch.long)]
    elif pattern == "uniform":
        cols = [rows % E, (rows + 1) % E]
    else:  # "empty experts": only experts 1 and 4 are ever chosen
        cols = [torch.where(rows % 2 == 0, 1, 4), torch.where(rows % 2 == 0, 4, 1)]
    return torch.stack(cols[:top_k], dim=1)


#: gpt-oss's activation (transformers' GptOssExperts defaults)
GPT_OSS = ClampedSwiGLU(alpha=1.702, limit=7.0)


def _weights(dtype: torch.dtype, seed: int, gate_scale: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    w13 = (torch.randn(E, 2 * INTER, H, generator=gen) * gate_scale * H**-0.5).to(dtype)
    w2 = (torch.randn(E, H, INTER, generator=gen) * INTER**-0.5).to(dtype)
    return w13, w2


def _biases(dtype: torch.dtype, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """w13_bias [E, 2I], w2_bias [E, H]."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(E, 2 * INTER, generator=gen).to(dtype), torch.randn(E, H, generator=gen).to(dtype)


@pytest.mark.parametrize("activation", [SILU_GLU, GPT_OSS], ids=["silu", "gpt-oss"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("top_k", [1, 2])
@pytest.mark.parametrize("pattern", ["one expert", "uniform", "empty experts"])
def test_matches_the_reference(
    pattern: str, top_k: int, dtype: torch.dtype, activation: MoEActivation
) -> None:
    """Unchosen experts' weights and biases are NaN: a block that used another expert's weights
    (or a padding row that reached the output) would show. gpt-oss's case has biases on both
    projections and gate/up projections large enough (std ~3) that both clamps bind; its
    intermediate values reach ~50, so its errors are measured against the output's scale."""
    gen = torch.Generator().manual_seed(1)
    gpt_oss = isinstance(activation, ClampedSwiGLU)
    for tokens in (1, 7, 33):
        ids = _routing(pattern, tokens, top_k)
        w13, w2 = _weights(dtype, 0, gate_scale=3.0 if gpt_oss else 1.0)
        b13, b2 = _biases(dtype, 5) if gpt_oss else (None, None)
        unchosen = torch.ones(E, dtype=torch.bool)
        unchosen[ids.unique()] = False
        for w in (w13, w2, b13, b2):
            if w is not None:
                w[unchosen] = float("nan")
        hidden = torch.randn(tokens, H, generator=gen).to(dtype)
        weights = torch.rand(tokens, top_k, generator=gen)
        opts = dict(activation=activation, w13_bias=b13, w2_bias=b2)
        got = fused_moe(hidden, weights, ids, w13, w2, **opts)  # type: ignore[arg-type]
        want = ref.fused_moe(
            hidden.float(),
            weights,
            ids,
            w13.float(),
            w2.float(),
            activation=activation,
            w13_bias=None if b13 is None else b13.float(),
            w2_bias=None if b2 is None else b2.float(),
        )
        assert got.dtype == dtype and got.shape == (tokens, H)
        scale = float(want.abs().max()) if gpt_oss else 1.0
        torch.testing.assert_close(
            got.float() / scale, want / scale, **TOL[dtype], msg=lambda m, n=tokens: f"{n} tokens: {m}"
        )
        if gpt_oss and tokens == 33:  # both clamps bind on some chosen (token, expert) pair
            pre = torch.einsum("th,eih->tei", hidden.float(), w13.float()) + b13.float()  # type: ignore[union-attr]
            pre = pre[torch.arange(tokens)[:, None], ids]  # [T, K, 2I]
            assert (pre[..., :INTER] > GPT_OSS.limit).any() and (pre[..., INTER:].abs() > GPT_OSS.limit).any()


def test_large_row_blocks_and_amd_launch() -> None:
    """A step with many pairs per expert takes 64-row blocks; an AMD target (64-wide waves)
    computes the same through the op table's entry, with int32 ids and bf16 routing weights."""
    w13, w2 = _weights(torch.float32, 2)
    gen = torch.Generator().manual_seed(3)
    tokens = 200  # 400 pairs over 6 experts: > 32 per expert
    hidden = torch.randn(tokens, H, generator=gen)
    ids = _routing("uniform", tokens, 2).to(torch.int32)
    weights = torch.rand(tokens, 2, generator=gen).to(torch.bfloat16)
    want = ref.fused_moe(hidden, weights, ids, w13, w2)
    for target in (GENERIC, amd_target("gfx942", 304)):
        op = triton_op_table(target).fused_moe
        assert op is not None
        torch.testing.assert_close(op(hidden, weights, ids, w13, w2), want, **TOL[torch.float32])


def test_strided_hidden_and_no_tokens() -> None:
    w13, w2 = _weights(torch.float32, 4)
    packed = torch.randn(5, 2 * H)
    hidden = packed[:, :H]  # a strided row view
    ids, weights = _routing("uniform", 5, 2), torch.rand(5, 2)
    want = ref.fused_moe(hidden, weights, ids, w13, w2)
    torch.testing.assert_close(fused_moe(hidden, weights, ids, w13, w2), want, **TOL[torch.float32])
    empty = fused_moe(torch.empty(0, H), torch.empty(0, 2), torch.empty(0, 2, dtype=torch.long), w13, w2)
    assert empty.shape == (0, H)


def test_plan_groups_pairs_by_expert_and_skips_unchosen_experts() -> None:
    """Decode: only the chosen experts get row blocks (the others' weights are never read);
    each block holds one expert's pairs, padding marked by the pair count."""
    ids = torch.tensor([[5, 2], [2, 0], [5, 2]])  # experts 1, 3, 4, 6, 7 unchosen
    plan = align_by_expert(ids, num_experts=8, block_m=4)
    n = ids.numel()
    # a bound from shapes (6 pairs, each of at most 6 experts padded by 3), not from the ids
    assert plan.sorted_ids.shape[0] == max_padded_rows(n, 8, 4) == 24
    blocks = plan.sorted_ids.view(-1, 4)
    experts = plan.block_experts.tolist()
    assert experts == [0, 2, 5, -1, -1, -1]
    flat = ids.reshape(-1)
    for b, e in enumerate(experts):
        pairs = [p for p in blocks[b].tolist() if p < n]
        if e < 0:
            assert pairs == []
        else:
            assert pairs == sorted(pairs) and pairs and all(int(flat[p]) == e for p in pairs)
    assert sorted(p for p in plan.sorted_ids.tolist() if p < n) == list(range(n))


@pytest.mark.parametrize("arch", ["qwen3_moe", "gpt_oss"])
def test_a_tiny_moe_model_built_with_the_table(tiny_model_dir, arch: str) -> None:  # type: ignore[no-untyped-def]
    """Qwen3-MoE and gpt-oss (4 experts, top-2; gpt-oss with its biases and clamped SwiGLU) in
    float32 built with the Triton op table: their MoE layers run the kernels, and a prefill of
    two requests gives the reference-built model's logits."""
    from hallm.core.model_loader import load_model
    from tests.utils.paged_forward import PagedRunner

    path = tiny_model_dir(arch)
    ids = list(range(3, 40))
    chunks = [("a", ids[:20]), ("b", ids[20:])]
    want = PagedRunner(load_model(str(path)).model).step(chunks)
    model = load_model(str(path), ops=triton_op_table(GENERIC)).model
    layers = [m for m in model.modules() if type(m).__name__ == "FusedMoE"]
    assert layers and all(m._op.func is fused_moe for m in layers)
    got = PagedRunner(model).step(chunks)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, atol=1e-4, rtol=0)
