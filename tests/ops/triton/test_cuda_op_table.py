"""The Triton op table of hallm-cuda and hallm-rocm (hallm.ops.triton.op_table, fused_decoder) in
Triton's interpreter: models built with it compute what models built with the references
compute, and each entry takes exactly the layers and steps it is meant to."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton")

from hallm.core.layers.op_context import building_with
from hallm.core.model_loader import load_model
from hallm.core.model_loader.loader import prepare_kernels
from hallm.ops.triton.fused_decoder import FusedDecoderStack
from hallm.ops.triton.op_table import triton_op_table
from hallm.ops.triton.skinny_linear import SKINNY_ROWS, SkinnyLinear, linear_op
from hallm.ops.triton.target import GENERIC
from hallm.platforms.ops import LinearWeights
from tests.utils.paged_forward import PagedRunner, _ReferenceBackend

TABLE = triton_op_table(GENERIC)


def test_the_table_reproduces_a_real_tiny_model(tiny_model_dir) -> None:  # type: ignore[no-untyped-def]
    """Qwen3 (q/k norm, biases, rotary, gated SiLU MLP) in float32: no stack (q/k norm), the
    Triton norms, rotary and SiLU, cuBLAS projections (fp32 weights): the reference's logits."""
    path = tiny_model_dir("qwen3")
    ids = list(range(3, 40))
    want = PagedRunner(load_model(str(path)).model).step([("a", ids[:20]), ("b", ids[20:])])
    model = load_model(str(path), ops=TABLE).model
    assert model.model.stack is None
    got = PagedRunner(model).step([("a", ids[:20]), ("b", ids[20:])])
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, atol=1e-4, rtol=0)


def test_skinny_projections_reproduce_a_bf16_decode(tiny_model_dir) -> None:  # type: ignore[no-untyped-def]
    """bf16, the table with and without its `linear` entry: a prefill (37 rows > SKINNY_ROWS:
    both F.linear, equal) then two decode steps (2 rows: every projection and the tied lm_head
    through the skinny kernel: equal up to summation order)."""
    path = tiny_model_dir("qwen3")
    ids = list(range(3, 40))
    steps = [[("a", ids[:20]), ("b", ids[20:])], [("a", [7]), ("b", [9])], [("a", [11]), ("b", [13])]]
    no_skinny = dataclasses.replace(TABLE, linear=None)
    plain = PagedRunner(load_model(str(path), dtype="bfloat16", ops=no_skinny).model)
    skinny = PagedRunner(load_model(str(path), dtype="bfloat16", ops=TABLE).model)
    assert skinny.model.lm_head.kernel is not None
    assert isinstance(skinny.model.lm_head.kernel.kernel, SkinnyLinear)
    for i, chunks in enumerate(steps):
        for g, w in zip(skinny.step(chunks), plain.step(chunks), strict=True):
            if i == 0:
                torch.testing.assert_close(g, w, atol=0, rtol=0)
            else:  # bf16 roundings of differently ordered fp32 sums, carried through 2 layers
                torch.testing.assert_close(g.float(), w.float(), atol=3e-2, rtol=3e-2)


def test_skinny_gemm_takes_only_small_16_bit_weights() -> None:
    make = linear_op(GENERIC)
    small = torch.randn(512, 256, dtype=torch.bfloat16)
    assert isinstance(make(LinearWeights(small, None)), SkinnyLinear)
    assert make(LinearWeights(torch.empty(4096, 2048, dtype=torch.bfloat16), None)) is None  # 16 MB
    assert make(LinearWeights(small.float(), None)) is None
    kernel = make(LinearWeights(small, torch.randn(512, dtype=torch.bfloat16)))
    x = torch.randn(2, 256, dtype=torch.bfloat16)
    torch.testing.assert_close(kernel(x), F.linear(x, small, kernel.bias), atol=2e-2, rtol=1.6e-2)


def _qwen2_model(
    seed: int, ops: Any, hidden: int = 384, heads: int = 12, dtype: torch.dtype = torch.float16, **config: Any
) -> torch.nn.Module:
    """A hallm Qwen2 (q/k/v biases, tied embeddings) built with `ops`, random weights. By
    default head_size 32, the smallest the fused stack's rotary epilogue tiles, with a hidden
    size of 1.5 tiles of K, so the qkv launch splits K two ways (the second one ragged) and
    merges the partials, and float16 (the stack takes 16-bit activations; float16's finer
    rounding than bf16's lets the comparison see a wrong sum)."""
    import transformers as tf

    from hallm.core.models.llama import Qwen2ForCausalLM

    cfg = tf.Qwen2Config(
        vocab_size=96,
        hidden_size=hidden,
        intermediate_size=192,
        num_hidden_layers=2,
        num_attention_heads=heads,
        num_key_value_heads=4,
        max_position_embeddings=256,
        tie_word_embeddings=True,
        **config,
    )
    torch.manual_seed(seed)
    with building_with(ops):
        model = Qwen2ForCausalLM(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(
                torch.randn_like(p) * (0.2 if "norm" in name else 0.05) + (1.0 if "norm" in name else 0.0)
            )
    model = model.to(dtype)
    rotary = model.model.rotary_emb
    rotary.inv_freq = rotary.inv_freq.float()  # as the loader keeps it (`to` casts buffers too)
    prepare_kernels(model)
    return model


def test_the_fused_stack_reproduces_the_model(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """The stack (input norm and rotary folded into qkv) against the reference build, float16:
    a prefill (more than SKINNY_ROWS rows: declined, the layers run one op at a time: two norms
    per layer + the final one), then decode steps of 1 and 2 requests, which take the stack (one
    norm launch per layer, before gate/up, + the final one). Leaving k unrotated moves the
    logits by ~0.6; rounding, 0.003."""
    import hallm.ops.triton.fused as kernels

    norms = []
    real_rms_norm = kernels.rms_norm
    monkeypatch.setattr(kernels, "rms_norm", lambda *a, **kw: norms.append(1) or real_rms_norm(*a, **kw))
    plain = PagedRunner(_qwen2_model(0, None), backend_cls=_ReferenceBackend)
    fused = PagedRunner(_qwen2_model(0, triton_op_table(GENERIC)), backend_cls=_ReferenceBackend)
    assert isinstance(fused.model.model.stack, FusedDecoderStack)
    assert sorted(n for n, _ in fused.model.named_parameters()) == sorted(
        n for n, _ in plain.model.named_parameters()
    )
    prefill = [("a", list(range(3, 3 + SKINNY_ROWS))), ("b", list(range(30, 41)))]
    steps = [prefill, [("a", [7]), ("b", [9])], [("a", [11])], [("a", [5]), ("b", [13])]]
    for i, chunks in enumerate(steps):
        norms.clear()
        got, want = fused.step(chunks), plain.step(chunks)
        assert len(norms) == (5 if i == 0 else 3)
        for g, w in zip(got, want, strict=True):
            # PyTorch rounds per op (rotary, SiLU, norm) where the kernels round once
            torch.testing.assert_close(g, w, atol=8e-3, rtol=8e-3)


_DECLINED = {
    "float32": {"dtype": torch.float32},  # the fused launches take 16-bit weights
    "head_size_16": {"hidden": 192},  # the rotary epilogue tiles heads of 32k dims
    # rotary over half of each head: the model offers no stack at all
    "partial_rotary": {
        "rope_parameters": {"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.5}
    },
}


@pytest.mark.parametrize("case", sorted(_DECLINED))
def test_models_the_stack_cannot_fold_run_one_op_at_a_time(case: str) -> None:
    plain = PagedRunner(_qwen2_model(1, None, **_DECLINED[case]), backend_cls=_ReferenceBackend)
    fused = PagedRunner(_qwen2_model(1, TABLE, **_DECLINED[case]), backend_cls=_ReferenceBackend)
    assert fused.model.model.stack is None
    for chunks in ([("a", list(range(3, 12)))], [("a", [7])], [("a", [5])]):
        for g, w in zip(fused.step(chunks), plain.step(chunks), strict=True):
            torch.testing.assert_close(g, w, atol=8e-3, rtol=8e-3)
