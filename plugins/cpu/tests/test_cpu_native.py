"""The native CPU kernels (hallm_cpu.native) against their oracles: the fp32 product, the op
table's references (hallm.ops.reference_ops), and dense attention over the unpaged keys/values
(hallm.ops.testing)."""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F
from hallm_cpu import native
from hallm_cpu.attention import CpuNativeAttention, CpuReferenceAttention
from hallm_cpu.linear import CpuLinear
from hallm_cpu.ops import cpu_op_table
from hallm_cpu.ops import rotary as cpu_rotary
from hallm_cpu.platform import CpuPlatform
from torch import nn

from hallm.core.layers.mlp import GatedMLP
from hallm.core.layers.op_context import building_with
from hallm.ops import reference_ops
from hallm.ops.testing import cache_slot_view, expected_attention, make_paged_batch
from hallm.platforms import AttentionSpec
from hallm.platforms.ops import LinearWeights

pytestmark = pytest.mark.skipif(not native.available(), reason="no C compiler: native kernels not built")

DTYPES = [torch.float32, torch.bfloat16]


def tol(dtype: torch.dtype) -> dict[str, float]:
    return {"atol": 1e-5, "rtol": 1e-5} if dtype == torch.float32 else {"atol": 2e-2, "rtol": 2e-2}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m", [1, 2, 3, 4, 5, 6, 7, 33, 200])  # every tail of 6-row tiles
@pytest.mark.parametrize(("n", "k"), [(1, 1), (5, 7), (64, 48), (130, 200), (9, 576)])
@pytest.mark.parametrize("bias", [False, True])
def test_linear_matches_fp32_product(dtype: torch.dtype, m: int, n: int, k: int, bias: bool) -> None:
    gen = torch.Generator().manual_seed(m * 1000 + n * 10 + k)
    # A strided x (every other row of a wider buffer), as a fused QKV split hands it over.
    x = torch.randn(2 * m, k + 3, generator=gen).to(dtype)[::2, 1 : k + 1]
    w = torch.randn(n, k, generator=gen).to(dtype)
    b = torch.randn(n, generator=gen).to(dtype) if bias else None
    expected = F.linear(x.double(), w.double(), None if b is None else b.double())
    got = native.linear(x, native.pack_linear(w), b, n)
    assert got.dtype == dtype and got.shape == (m, n)
    # fp32 sums of k products, accumulated in order: the error grows like sqrt(k).
    atol = 2e-6 * k**0.5 if dtype == torch.float32 else 2e-2 * max(1.0, k**0.5 / 8)
    torch.testing.assert_close(
        got.double(), expected, atol=atol, rtol=1e-5 if dtype == torch.float32 else 1e-2
    )


@pytest.mark.parametrize("dtype", DTYPES)
def test_cpu_linear_packs_once_and_drops_the_unpacked_weight(dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    ref = nn.Linear(40, 24).to(dtype)
    weights = LinearWeights(ref.weight.detach(), ref.bias.detach())
    fast = CpuLinear(weights, native_bf16=False, use_native=True)
    assert fast.weight is None and fast.packed is not None and fast.packed.shape == (2, 40, 16)
    for rows in (1, 5, 64):
        x = torch.randn(rows, 40).to(dtype)
        want = F.linear(x.float(), ref.weight.float(), ref.bias.float())
        torch.testing.assert_close(fast(x).float(), want, **tol(dtype))
    # A CPU with native bf16 compute keeps bf16 weights on oneDNN/MKL unless the kernels were
    # built with the bf16 dot-product instructions.
    on_native_bf16 = CpuLinear(weights, native_bf16=True, use_native=True)
    assert (on_native_bf16.packed is None) == (dtype == torch.bfloat16 and not native.bf16_dot())


def test_widened_bf16_path_matches_where_the_dot_product_is_built(monkeypatch) -> None:
    """The AVX2 path that widens bf16 panels (what a CPU without AVX512-BF16 runs), built here
    with the bf16 dot product switched off, gives the same answers."""
    if not native.bf16_dot():
        pytest.skip("the default build already is the widened path")
    widened = native.build((*native.FLAGS, *native.ARCH_FLAGS, "-mno-avx512bf16"))
    monkeypatch.setattr(native, "library", lambda: widened)
    assert not native.bf16_dot()
    gen = torch.Generator().manual_seed(4)
    for m, n, k in ((1, 19, 75), (7, 40, 48), (33, 130, 200)):
        x = torch.randn(m, k, generator=gen).to(torch.bfloat16)
        w = torch.randn(n, k, generator=gen).to(torch.bfloat16)
        packed = native.pack_linear(w)
        assert packed.shape == (-(-n // 16), k, 16)
        want = F.linear(x.double(), w.double())
        torch.testing.assert_close(native.linear(x, packed, None, n).double(), want, atol=4e-2, rtol=1e-2)


def test_bf16_panels_hold_k_pairs_where_the_dot_product_is_built() -> None:
    """With AVX512-BF16, bf16 panels pad K to even and interleave k-pairs; fp32 panels never do."""
    w = torch.arange(3 * 5, dtype=torch.float32).view(3, 5)  # N=3, K=5
    packed = native.pack_linear(w.to(torch.bfloat16)).float()
    assert native.pack_linear(w).shape == (1, 5, 16)
    if native.bf16_dot():
        assert packed.shape == (1, 6, 16)
        pairs = packed.view(3, 16, 2)  # [k/2, feature, k%2]
        torch.testing.assert_close(pairs[:, :3].permute(1, 0, 2).reshape(3, 6)[:, :5], w)
        assert torch.all(pairs[2, :, 1] == 0) and torch.all(pairs[:, 3:] == 0)
    else:
        assert packed.shape == (1, 5, 16)
        torch.testing.assert_close(packed[0, :, :3].t(), w)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_residual", [False, True])
def test_rms_norm_matches_the_reference(dtype: torch.dtype, with_residual: bool) -> None:
    torch.manual_seed(1)
    weight = torch.randn(96).to(dtype)
    x = torch.randn(7, 96).to(dtype)
    if with_residual:
        r = torch.randn(7, 96).to(dtype)
        want, want_res = reference_ops.rms_norm(x, weight, 1e-5, r)
        got, got_res = native.rms_norm(x, weight, 1e-5, r)
        torch.testing.assert_close(got_res, want_res, atol=0, rtol=0)  # the residual sum rounds once
    else:
        want, got = reference_ops.rms_norm(x, weight, 1e-5), native.rms_norm(x, weight, 1e-5)
    torch.testing.assert_close(got.float(), want.float(), **tol(dtype))


@pytest.mark.parametrize("dtype", DTYPES)
def test_rotary_matches_the_reference_in_place_on_strided_views(dtype: torch.dtype) -> None:
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, 64, 2).float() / 64))
    t, hq, hk, d = 5, 4, 2, 64
    qkv = torch.randn(t, (hq + 2 * hk) * d).to(dtype)
    q = qkv[:, : hq * d].view(t, hq, d)
    k = qkv[:, hq * d : (hq + hk) * d].view(t, hk, d)
    v_before = qkv[:, (hq + hk) * d :].clone()
    positions = torch.tensor([0, 1, 7, 300, 40000])
    want_q, want_k = reference_ops.rotary(positions, q.clone(), k.clone(), inv_freq, 1.0)
    got_q, got_k = cpu_rotary(positions, q, k, inv_freq, 1.0)
    assert got_q.data_ptr() == q.data_ptr()  # rotated in place, no copy of the QKV output
    torch.testing.assert_close(got_q.float(), want_q.float(), **tol(dtype))
    torch.testing.assert_close(got_k.float(), want_k.float(), **tol(dtype))
    assert torch.equal(qkv[:, (hq + hk) * d :], v_before)


@pytest.mark.parametrize("dtype", DTYPES)
def test_gated_mlp_built_with_the_cpu_table_matches_the_reference_build(dtype: torch.dtype) -> None:
    torch.manual_seed(2)
    with building_with(None):
        core = GatedMLP(48, 80, "silu").to(dtype)
    with building_with(cpu_op_table()):
        fast = GatedMLP(48, 80, "silu").to(dtype)
    for p in core.parameters():
        nn.init.normal_(p, std=0.1)
    fast.load_state_dict(core.state_dict())
    fast.gate_up_proj.prepare_kernels()
    fast.down_proj.prepare_kernels()
    assert isinstance(fast.down_proj.kernel.kernel, CpuLinear)
    x = torch.randn(6, 48).to(dtype)
    torch.testing.assert_close(fast(x).float(), core(x).float(), **tol(dtype))


@pytest.mark.parametrize("dtype", DTYPES)
def test_silu_and_mul_matches_torch_across_the_range(dtype: torch.dtype) -> None:
    """The vectorized sigmoid (exp of -|x|) and the scalar tail (I = 8 k + 1) against torch, from
    x = -100 (silu underflows to -0) through 0 to +100, on rows with a stride past 2 I."""
    gate = torch.cat(
        [torch.linspace(-100, 100, 301), torch.randn(400) * 4, torch.tensor([0.0, -0.0, 88.0, -88.0])]
    )
    up = torch.randn_like(gate)
    i = gate.numel()  # 705
    rows = torch.stack([torch.cat([gate, up, up[:3]]), torch.cat([up, gate, gate[:3]])]).to(
        dtype
    )  # [2, 2 I + 3]
    gate_up = rows[:, : 2 * i]
    want = (F.silu(gate_up[:, :i].double()).to(dtype).double() * gate_up[:, i:].double()).to(dtype)
    torch.testing.assert_close(native.silu_and_mul(gate_up).float(), want.float(), **tol(dtype))


ATTENTION_CASES = [
    # (query_lens, context_lens, heads, kv_heads, head_size, block_size)
    ([1, 1, 1], [5, 40, 17], 8, 2, 64, 16),  # decode, GQA
    ([9, 1, 33, 1], [0, 12, 6, 70], 4, 4, 32, 4),  # mixed prefill + decode, MHA
    ([17], [0], 6, 1, 80, 1),  # prefill, MQA, block size 1, head size not a power of 2
    ([3, 20], [31, 0], 14, 2, 64, 32),  # chunked prefill, Qwen2.5-0.5B heads
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", ATTENTION_CASES)
@pytest.mark.parametrize(("window", "soft_cap"), [(None, None), (7, None), (None, 5.0)])
def test_paged_attention_matches_dense_attention(dtype, case, window, soft_cap) -> None:
    query_lens, context_lens, heads, kv_heads, head_size, block_size = case
    batch = make_paged_batch(
        query_lens, context_lens, num_heads=heads, num_kv_heads=kv_heads, head_size=head_size,
        block_size=block_size, dtype=dtype, num_padding_tokens=2, seed=len(query_lens),
    )  # fmt: skip
    spec = AttentionSpec(
        heads, kv_heads, head_size, head_size**-0.5, str(dtype).removeprefix("torch."),
        block_size=block_size, sliding_window=window, logits_soft_cap=soft_cap,
    )  # fmt: skip
    assert CpuNativeAttention.validate(spec) == []
    backend = CpuNativeAttention(spec)
    before = cache_slot_view(batch.kv_cache).clone()
    out = torch.full_like(batch.query, float("nan"))
    meta = backend.build_metadata(batch.layout)
    assert backend.forward(batch.query, batch.key, batch.value, batch.kv_cache, meta, out) is out
    expected = expected_attention(batch, spec.scale, window, soft_cap)
    atol = 2e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(out.double(), expected, atol=atol, rtol=atol)
    # Exactly the step's slots were written, with the step's keys/values; the poison elsewhere stays.
    slots = torch.from_numpy(batch.layout.slot_mapping)
    real = slots >= 0
    after = cache_slot_view(batch.kv_cache)
    assert torch.equal(after[0, slots[real]], batch.key[real]) and torch.equal(
        after[1, slots[real]], batch.value[real]
    )
    untouched = torch.ones(after.shape[1], dtype=torch.bool)
    untouched[slots[real]] = False
    torch.testing.assert_close(after[:, untouched], before[:, untouched], equal_nan=True, atol=0, rtol=0)


def test_platform_prefers_native_attention_and_falls_back_without_a_compiler(
    tmp_path, monkeypatch, caplog
) -> None:
    assert CpuPlatform().attention_backends()[0] is CpuNativeAttention
    spec = AttentionSpec(4, 2, 32, 0.2, "float32")
    monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
    monkeypatch.setenv("HALLM_CACHE_DIR", str(tmp_path))
    native.library.cache_clear()
    try:
        with caplog.at_level(logging.WARNING, logger="hallm.cpu"):
            assert native.library() is None
        assert "pure-torch" in caplog.text
        assert any("not built" in r for r in CpuNativeAttention.validate(spec))
        assert CpuReferenceAttention.validate(spec) == []
    finally:
        monkeypatch.undo()
        native.library.cache_clear()
    assert native.available()


@pytest.mark.parametrize("dtype", DTYPES)
def test_portable_build_without_avx2_matches(dtype: torch.dtype, monkeypatch) -> None:
    """The C fallbacks (what a CPU without AVX2 runs): built without -march, same answers."""
    portable = native.build(native.FLAGS)
    monkeypatch.setattr(native, "library", lambda: portable)
    gen = torch.Generator().manual_seed(3)
    for m in (1, 2, 5):
        x = torch.randn(m, 75, generator=gen).to(dtype)
        w = torch.randn(19, 75, generator=gen).to(dtype)
        want = F.linear(x.float(), w.float())
        torch.testing.assert_close(
            native.linear(x, native.pack_linear(w), None, 19).float(), want, **tol(dtype)
        )
    batch = make_paged_batch(
        [5, 1], [3, 20], num_heads=4, num_kv_heads=2, head_size=40, block_size=8, dtype=dtype
    )
    out = torch.empty_like(batch.query)
    layout = batch.layout.tensors
    native.paged_attention(
        batch.query, batch.key, batch.value, batch.kv_cache, layout.slot_mapping, layout.query_start_loc,
        layout.context_lens, layout.block_tables, 0.3, out,
    )  # fmt: skip
    atol = 2e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(out.double(), expected_attention(batch, 0.3), atol=atol, rtol=atol)


def test_build_is_cached_per_source_and_machine(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("HALLM_CACHE_DIR", str(tmp_path))
    native.library.cache_clear()
    try:
        assert native.library() is not None
        (built,) = (tmp_path / "cpu-kernels").glob("kernels-*.so")
        mtime = built.stat().st_mtime_ns
        native.library.cache_clear()
        assert native.library() is not None
        assert built.stat().st_mtime_ns == mtime  # loaded, not rebuilt
    finally:
        native.library.cache_clear()


def test_inconsistent_widths_are_clear_errors_not_out_of_bounds_reads() -> None:
    """A config inconsistent with its weights (which HF rejects) reaches the native kernels as a
    too-wide input: a ValueError naming the widths, never zeros or a read past the row."""
    from hallm.platforms import LinearWeights

    linear = CpuLinear(LinearWeights(torch.randn(8, 16), None), native_bf16=False, use_native=True)
    with pytest.raises(ValueError, match=r"takes 16 input features, got an input of shape \(3, 4096\)"):
        linear(torch.randn(3, 4096))
    with pytest.raises(ValueError, match=r"input width 4096 does not match the norm weight \(16\)"):
        native.rms_norm(torch.randn(3, 4096), torch.ones(16), 1e-6)
    with pytest.raises(ValueError, match="residual shape"):
        native.rms_norm(torch.randn(3, 16), torch.ones(16), 1e-6, residual=torch.randn(3, 8))
