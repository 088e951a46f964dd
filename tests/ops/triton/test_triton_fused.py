"""hallm.ops.triton.fused in the interpreter against the PyTorch layers they replace."""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton")

from hallm.core.layers.mlp import GatedMLP
from hallm.core.layers.norm import RMSNorm
from hallm.core.layers.rotary import apply_rotary

# float32: rounding only; bf16: one unit in the last place (the kernels round once, PyTorch per op)
TOL = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.bfloat16: dict(atol=2e-2, rtol=1.6e-2)}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rms_norm_with_and_without_residual(dtype: torch.dtype) -> None:
    from hallm.ops.triton.fused import rms_norm

    torch.manual_seed(0)
    norm = RMSNorm(72, 1e-6).to(dtype)
    norm.weight.data.normal_(1.0, 0.2)
    x, r = torch.randn(5, 72, dtype=dtype), torch.randn(5, 72, dtype=dtype)
    torch.testing.assert_close(rms_norm(x, norm.weight, 1e-6), norm(x), **TOL[dtype])
    out, res = rms_norm(x, norm.weight, 1e-6, r)
    want_out, want_res = norm(x, r)
    torch.testing.assert_close(res, want_res, **TOL[dtype])
    torch.testing.assert_close(out, want_out, **TOL[dtype])
    # per-head norm (Qwen3's q/k norm) of a strided [T, H, D] view
    qkv = torch.randn(3, 4 * 16 + 8, dtype=dtype)
    q = qkv[:, :64].view(3, 4, 16)
    head_norm = RMSNorm(16, 1e-6).to(dtype)
    torch.testing.assert_close(rms_norm(q, head_norm.weight, 1e-6), head_norm(q), **TOL[dtype])


@pytest.mark.parametrize("rotary_dim", [16, 8])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rotary_full_and_partial(dtype: torch.dtype, rotary_dim: int) -> None:
    from hallm.ops.triton.fused import rotary

    torch.manual_seed(1)
    qkv = torch.randn(4, 6 * 16 + 2 * 2 * 16, dtype=dtype)  # a fused projection: strided views
    q, k = qkv[:, :96].view(4, 6, 16), qkv[:, 96:128].view(4, 2, 16)
    positions = torch.tensor([0, 5, 17, 3000])
    inv_freq = 1.0 / (10000 ** (torch.arange(0, rotary_dim, 2).float() / rotary_dim))
    freqs = positions.float()[:, None] * inv_freq[None]
    cos = (freqs.cos() * 0.9).to(dtype)[:, None]
    sin = (freqs.sin() * 0.9).to(dtype)[:, None]
    got_q, got_k = rotary(positions, q, k, inv_freq, 0.9)
    torch.testing.assert_close(got_q, apply_rotary(q, cos, sin), **TOL[dtype])
    torch.testing.assert_close(got_k, apply_rotary(k, cos, sin), **TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_silu_and_mul(dtype: torch.dtype) -> None:
    from hallm.ops.triton.fused import silu_and_mul

    x = torch.randn(3, 2 * 1100, dtype=dtype)  # two column blocks, the second partial
    torch.testing.assert_close(silu_and_mul(x), F.silu(x[:, :1100]) * x[:, 1100:], **TOL[dtype])


def test_fused_layers_reproduce_the_model(tiny_model_dir) -> None:  # type: ignore[no-untyped-def]
    """hallm-cuda's layer swap (compile_model) on a real tiny model: same logits as unfused."""
    fused_mod = pytest.importorskip("hallm_cuda.fused")
    from hallm.core.model_loader import load_model
    from tests.utils.paged_forward import PagedRunner

    path = tiny_model_dir("qwen3")  # q/k norm, biases, rotary, gated SiLU MLP
    ids = list(range(3, 40))
    plain = load_model(str(path)).model
    want = PagedRunner(plain).step([("a", ids[:20]), ("b", ids[20:])])
    fused = fused_mod.fuse_layers(load_model(str(path)).model)
    names = {type(m).__name__ for m in fused.modules()}
    assert {"FusedRMSNorm", "FusedRotaryEmbedding", "FusedGatedMLP"} <= names
    assert "FusedDecoderLayer" not in names  # q/k norm: not the plain Llama layer
    assert not {"RMSNorm", "RotaryEmbedding", "GatedMLP"} & names
    # every projection is a SkinnyLinear but gate/up, whose skinny form is FusedGatedMLP's own
    plain_linear = {n.rsplit(".", 1)[-1] for n, m in fused.named_modules() if type(m) is torch.nn.Linear}
    assert plain_linear == {"gate_up_proj"}
    got = PagedRunner(fused).step([("a", ids[:20]), ("b", ids[20:])])
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, atol=1e-4, rtol=0)


def test_skinny_projections_reproduce_a_bf16_decode(tiny_model_dir, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """bf16, fused layers with and without the skinny GEMM: a prefill (37 rows > the limit, so
    both take F.linear: equal) then two decode steps (2 rows: every projection, the gated
    gate/up (opted in) and the tied lm_head through the skinny kernel: equal up to summation
    order)."""
    fused_mod = pytest.importorskip("hallm_cuda.fused")
    from hallm.core.model_loader import load_model
    from tests.utils.paged_forward import PagedRunner

    path = tiny_model_dir("qwen3")
    ids = list(range(3, 40))
    steps = [[("a", ids[:20]), ("b", ids[20:])], [("a", [7]), ("b", [9])], [("a", [11]), ("b", [13])]]
    monkeypatch.setenv("HALLM_CUDA_SKINNY_ROWS", "0")
    cublas = PagedRunner(fused_mod.fuse_layers(load_model(str(path), dtype="bfloat16").model))
    monkeypatch.setenv("HALLM_CUDA_SKINNY_ROWS", "8")
    monkeypatch.setenv("HALLM_CUDA_SKINNY_GATED_ROWS", "8")
    skinny = PagedRunner(fused_mod.fuse_layers(load_model(str(path), dtype="bfloat16").model))
    assert not any(type(m).__name__ == "SkinnyLinear" for m in cublas.model.modules())
    assert any(type(m).__name__ == "SkinnyLinear" for m in skinny.model.modules())
    for i, chunks in enumerate(steps):
        for g, w in zip(skinny.step(chunks), cublas.step(chunks), strict=True):
            if i == 0:
                torch.testing.assert_close(g, w, atol=0, rtol=0)
            else:  # bf16 roundings of differently ordered fp32 sums, carried through 2 layers
                torch.testing.assert_close(g.float(), w.float(), atol=3e-2, rtol=3e-2)


def test_skinny_gemm_takes_only_small_weights() -> None:
    """Weights past SKINNY_MAX_WEIGHT_BYTES keep cuBLAS (measured faster there on an H200)."""
    fused_mod = pytest.importorskip("hallm_cuda.fused")
    model = torch.nn.Sequential(torch.nn.Linear(256, 512), torch.nn.Linear(2048, 4096)).to(torch.bfloat16)
    fused_mod.fuse_layers(model)
    assert [type(m).__name__ for m in model] == ["SkinnyLinear", "Linear"]
    x = torch.randn(2, 256, dtype=torch.bfloat16)
    torch.testing.assert_close(
        model[0](x), F.linear(x, model[0].weight, model[0].bias), atol=2e-2, rtol=1.6e-2
    )


def test_fused_gated_mlp_caps_its_rows() -> None:
    """HALLM_CUDA_SKINNY_GATED_ROWS past the kernel's 64 rows: larger steps take cuBLAS + SiLU."""
    fused_mod = pytest.importorskip("hallm_cuda.fused")
    from hallm.ops.triton.skinny_gemm import MAX_ROWS

    torch.manual_seed(6)
    mlp = GatedMLP(32, 24, "silu").to(torch.bfloat16)
    fused = fused_mod.FusedGatedMLP(mlp, max_rows=8, gated_rows=100)
    assert fused.max_rows == MAX_ROWS
    for rows in (3, MAX_ROWS + 16):
        x = torch.randn(rows, 32, dtype=torch.bfloat16)
        torch.testing.assert_close(fused(x), mlp(x), atol=3e-2, rtol=3e-2)


def _qwen2_model(
    seed: int, hidden: int = 384, heads: int = 12, dtype: torch.dtype = torch.float16, **config: Any
) -> torch.nn.Module:
    """A hallm Qwen2 (q/k/v biases, tied embeddings), random weights. By default head_size 32,
    the smallest the fused decoder layer's rotary epilogue tiles, with a hidden size of 1.5
    tiles of K, so the qkv launch splits K two ways (the second one ragged) and merges the
    partials, and float16 (the fused path takes 16-bit activations; float16's finer rounding
    than bf16's lets the comparison see a wrong sum)."""
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
    model = Qwen2ForCausalLM(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(
                torch.randn_like(p) * (0.2 if "norm" in name else 0.05) + (1.0 if "norm" in name else 0.0)
            )
    return model.to(dtype)


@pytest.mark.parametrize("fold_gate_up", ["1", "0"])
def test_fused_decoder_layer_reproduces_the_model(monkeypatch, fold_gate_up: str) -> None:  # type: ignore[no-untyped-def]
    """Whole-layer fusion (norms, rotary and SiLU folded into the projections) on decode steps
    against the plain PyTorch modules, float16: prefill (too many rows: the stock forward), then
    decode steps of 1 and 2 requests, which must take the fused path (one RMSNorm launch per
    step: the final norm; with HALLM_CUDA_FUSED_GATE_UP=0 also one per layer, before gate/up).
    Leaving k unrotated moves the logits by ~0.6; rounding, 0.003."""
    fused_mod = pytest.importorskip("hallm_cuda.fused")
    import hallm.ops.triton.fused as kernels
    from tests.utils.paged_forward import PagedRunner, _ReferenceBackend

    monkeypatch.setenv("HALLM_CUDA_SKINNY_ROWS", "4")
    monkeypatch.setenv("HALLM_CUDA_FUSED_GATE_UP", fold_gate_up)
    plain = PagedRunner(_qwen2_model(0), backend_cls=_ReferenceBackend)
    fused = PagedRunner(fused_mod.fuse_layers(_qwen2_model(0)), backend_cls=_ReferenceBackend)
    names = [type(m).__name__ for m in fused.model.modules()]
    assert names.count("FusedDecoderLayer") == 2 and "LlamaDecoderLayer" not in names
    assert sorted(n for n, _ in fused.model.named_parameters()) == sorted(
        n for n, _ in plain.model.named_parameters()
    )
    norms = []
    real_rms_norm = kernels.rms_norm
    monkeypatch.setattr(kernels, "rms_norm", lambda *a, **kw: norms.append(1) or real_rms_norm(*a, **kw))
    steps = [
        [("a", list(range(3, 20))), ("b", list(range(30, 41)))],
        [("a", [7]), ("b", [9])],
        [("a", [11])],
        [("a", [5]), ("b", [13])],
    ]
    for i, chunks in enumerate(steps):
        norms.clear()
        got, want = fused.step(chunks), plain.step(chunks)
        # the stock forward (prefill): 2 per layer + the final norm
        assert len(norms) == (5 if i == 0 else 1 if fold_gate_up == "1" else 3)
        for g, w in zip(got, want, strict=True):
            # PyTorch rounds per op (rotary, SiLU, norm) where the kernels round once
            torch.testing.assert_close(g, w, atol=8e-3, rtol=8e-3)


_FALLBACKS = {
    # (model kwargs, whether fuse_layers makes FusedDecoderLayers)
    "float32": ({"dtype": torch.float32}, False),  # the fused launches take 16-bit weights
    "head_size_16": ({"hidden": 192}, False),  # the rotary epilogue tiles heads of 32k dims
    # rotary over half of each head: the layer is fused, its decode steps take the stock path
    "partial_rotary": (
        {"rope_parameters": {"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.5}},
        True,
    ),
}


@pytest.mark.parametrize("case", sorted(_FALLBACKS))
def test_fused_decoder_layer_keeps_the_stock_path_where_it_cannot_fold(monkeypatch, case: str) -> None:  # type: ignore[no-untyped-def]
    """Models the fused decoder layer cannot fold keep the stock forward at every step (two
    RMSNorm launches per layer and step, plus the final norm) and the plain model's logits."""
    fused_mod = pytest.importorskip("hallm_cuda.fused")
    import hallm.ops.triton.fused as kernels
    from tests.utils.paged_forward import PagedRunner, _ReferenceBackend

    monkeypatch.setenv("HALLM_CUDA_SKINNY_ROWS", "4")
    kwargs, wrapped = _FALLBACKS[case]
    plain = PagedRunner(_qwen2_model(1, **kwargs), backend_cls=_ReferenceBackend)
    fused = PagedRunner(fused_mod.fuse_layers(_qwen2_model(1, **kwargs)), backend_cls=_ReferenceBackend)
    names = [type(m).__name__ for m in fused.model.modules()]
    assert names.count("FusedDecoderLayer") == (2 if wrapped else 0)
    norms = []
    real_rms_norm = kernels.rms_norm
    monkeypatch.setattr(kernels, "rms_norm", lambda *a, **kw: norms.append(1) or real_rms_norm(*a, **kw))
    for chunks in ([("a", list(range(3, 12)))], [("a", [7])], [("a", [5])]):
        norms.clear()
        got, want = fused.step(chunks), plain.step(chunks)
        assert len(norms) == 5
        for g, w in zip(got, want, strict=True):
            torch.testing.assert_close(g, w, atol=8e-3, rtol=8e-3)


def test_swap_layers_visits_a_fused_decoder_layers_children_once(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """A decoder layer's `make` swaps the layer's children itself; the outer walk must not hand
    the detached originals to `make` again (stray SkinnyLinears, counts of modules that are not
    in the model)."""
    fused_mod = pytest.importorskip("hallm_cuda.fused")
    from hallm.ops import fusion

    monkeypatch.setenv("HALLM_CUDA_SKINNY_ROWS", "4")
    model = _qwen2_model(0)
    seen: list[int] = []
    real_make = fused_mod._replacement
    monkeypatch.setattr(fused_mod, "_replacement", lambda k, m, r: seen.append(id(m)) or real_make(k, m, r))
    counts = fusion.swap_layers(model, lambda k, m: fused_mod._replacement(k, m, 4), "test")
    assert len(seen) == len(set(seen))
    # 2 layers, the lm_head (small: a SkinnyLinear), the final norm, the rotary
    assert counts == {"LlamaDecoderLayer": 2, "Linear": 1, "RMSNorm": 1, "RotaryEmbedding": 1}
