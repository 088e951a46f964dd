"""L1 op table: every entry of `Platform.op_table()` against its reference in hallm.ops.reference_ops
(`temperature_sample`, which draws at random, against the distribution it must draw from).

Each entry the platform provides runs on random inputs on the device, in every dtype the
platform declares, and must match the reference computed from the same inputs in float32. An
entry the table leaves None is not applicable (the layers run the reference). The decoder stack
is checked end to end at L3 (greedy tokens against the CPU plugin), where the model takes it.
"""

from __future__ import annotations

from typing import Any

import pytest

from hallm.conformance.target import Target
from hallm.platforms import DTYPE_NAMES

pytestmark = [pytest.mark.hallm_level(1)]

#: The entries checked here, each as (inputs, call) builders below.
OPS = ("rms_norm", "rotary", "silu_and_mul", "linear", "fused_moe")
#: Tolerances against the float32 reference: 16-bit kernels may round once where the
#: reference rounds per op (and sum in another order).
TOL = {"float32": (2e-5, 2e-5), "bfloat16": (3e-2, 2e-2), "float16": (5e-3, 5e-3)}


def _entry(target: Target, op: str, dtype: str) -> Any:
    if dtype not in target.capabilities().dtypes:
        pytest.skip(f"not applicable: {target.device_id} does not declare {dtype}")
    table = target.platform().op_table()
    fn = getattr(table, op)
    if fn is None:
        pytest.skip(f"not applicable: the op table leaves {op} to the reference")
    return fn


def _close(name: str, got: Any, want: Any, dtype: str) -> None:
    import torch

    atol, rtol = TOL[dtype]
    got = got.detach().float().cpu()
    want = want.detach().float().cpu()
    if got.shape != want.shape:
        pytest.fail(
            f"{name}: shape {tuple(got.shape)}, the reference gives {tuple(want.shape)}", pytrace=False
        )
    if not torch.allclose(got, want, atol=atol, rtol=rtol, equal_nan=False):
        err = (got - want).abs()
        worst = int(err.flatten().argmax())
        pytest.fail(
            f"{name} ({dtype}): max abs error {float(err.max()):.3g} at flat index {worst} "
            f"(got {float(got.flatten()[worst]):.6g}, reference {float(want.flatten()[worst]):.6g}); "
            f"tolerance atol={atol} rtol={rtol}",
            pytrace=False,
        )


@pytest.mark.hallm_group("L1 op table")
@pytest.mark.hallm_requires("available")
@pytest.mark.parametrize("dtype", DTYPE_NAMES)
@pytest.mark.parametrize("op", OPS)
def test_op_matches_its_reference(target: Target, op: str, dtype: str) -> None:
    """The entry's output on random inputs (odd sizes, strided rows) equals the reference's."""
    import torch

    from hallm.ops import reference_ops as ref
    from hallm.platforms.ops import ClampedSwiGLU, LinearWeights

    fn = _entry(target, op, dtype)
    dev = target.platform().device(0)
    dt = getattr(torch, dtype)
    gen = torch.Generator().manual_seed(OPS.index(op))

    def randn(*shape: int, scale: float = 1.0) -> torch.Tensor:
        return (torch.randn(*shape, generator=gen) * scale).to(dt).to(dev)

    if op == "rms_norm":
        x, w, r = randn(7, 200), randn(200, scale=0.3) + 1, randn(7, 200)
        _close("rms_norm(x)", fn(x, w, 1e-6, None), ref.rms_norm(x.float(), w.float(), 1e-6), dtype)
        got, got_res = fn(x, w, 1e-6, r)
        want, want_res = ref.rms_norm(x.float(), w.float(), 1e-6, r.float())
        _close("rms_norm(x, residual) residual sum", got_res, want_res, dtype)
        _close("rms_norm(x, residual)", got, want, dtype)
        heads = randn(5, 3, 64)  # a per-head norm (q/k norm) over the last dim
        _close(
            "rms_norm over heads",
            fn(heads, w[:64], 1e-6, None),
            ref.rms_norm(heads.float(), w[:64].float(), 1e-6),
            dtype,
        )
    elif op == "rotary":
        t, hq, hk, d = 6, 4, 2, 64
        qkv = randn(t, (hq + 2 * hk) * d)  # views into one fused projection, as the layers pass them
        q, k = qkv[:, : hq * d].view(t, hq, d), qkv[:, hq * d : (hq + hk) * d].view(t, hk, d)
        positions = torch.tensor([0, 1, 5, 77, 1000, 4095]).to(dev)
        inv_freq = (1.0 / 10000 ** (torch.arange(0, d, 2).float() / d)).to(dev)
        want_q, want_k = ref.rotary(positions, q.float(), k.float(), inv_freq, 0.9)
        got_q, got_k = fn(positions, q, k, inv_freq, 0.9)
        _close("rotary q", got_q, want_q, dtype)
        _close("rotary k", got_k, want_k, dtype)
    elif op == "silu_and_mul":
        x = randn(5, 2 * 300)
        _close("silu_and_mul", fn(x), ref.silu_and_mul(x.float()), dtype)
    elif op == "linear":
        for rows, n, k, bias in ((1, 96, 200, True), (5, 250, 128, False), (33, 64, 300, True)):
            w = randn(n, k, scale=k**-0.5)
            b = randn(n) if bias else None
            kernel = fn(LinearWeights(w.clone(), None if b is None else b.clone()))
            if kernel is None:
                continue  # the entry declines this layer: the layer runs F.linear
            x = randn(rows, k)
            want = torch.nn.functional.linear(x.float(), w.float(), None if b is None else b.float())
            _close(f"linear {rows}x{k} @ [{n}, {k}]", kernel(x), want, dtype)
    else:  # fused_moe
        t, h, inter, e, top_k = 9, 64, 48, 6, 2
        hidden = randn(t, h)
        w13, w2 = randn(e, 2 * inter, h, scale=h**-0.5), randn(e, h, inter, scale=inter**-0.5)
        weights = torch.rand(t, top_k, generator=gen).to(dev)
        rows = torch.arange(t)
        zeros = torch.zeros(t, dtype=torch.long)
        patterns = {
            "all tokens to expert 0 (and 1)": torch.stack([zeros, zeros + 1], 1),
            "uniform": torch.stack([rows % e, (rows + 1) % e], 1),
            "experts 1..4 empty": torch.stack([zeros, zeros + e - 1], 1),
            "one token": torch.stack([rows % e, (rows + 1) % e], 1)[:1],
        }
        # gpt-oss's experts: biases on both projections and its clamped SwiGLU, gate/up
        # projections large enough that the clamps bind (errors scale with the output: / scale)
        big13 = randn(e, 2 * inter, h, scale=3 * h**-0.5)
        b13, b2 = randn(e, 2 * inter, scale=0.5), randn(e, h, scale=0.5)
        gpt_oss = {"activation": ClampedSwiGLU(alpha=1.702, limit=7.0), "w13_bias": b13, "w2_bias": b2}
        for label, ids in patterns.items():
            n, ids = ids.shape[0], ids.to(dev)
            want = ref.fused_moe(hidden[:n].float(), weights[:n], ids, w13.float(), w2.float())
            _close(f"fused_moe {label}", fn(hidden[:n], weights[:n], ids, w13, w2), want, dtype)
            want = ref.fused_moe(
                hidden[:n].float(),
                weights[:n],
                ids,
                big13.float(),
                w2.float(),
                activation=gpt_oss["activation"],
                w13_bias=b13.float(),
                w2_bias=b2.float(),
            )
            got = fn(hidden[:n], weights[:n], ids, big13, w2, **gpt_oss)
            scale = want.abs().max()
            _close(f"fused_moe gpt-oss (biases, clamped SwiGLU) {label}", got / scale, want / scale, dtype)


@pytest.mark.hallm_group("L1 op table")
@pytest.mark.hallm_requires("available")
@pytest.mark.parametrize("dtype", DTYPE_NAMES)
def test_temperature_sample_draws_from_the_tempered_softmax(target: Target, dtype: str) -> None:
    """`temperature_sample`: over a vocabulary of 20,000 tokens, greedy rows (temperature 0)
    take the first index of their maximum (ties far apart, across a 4096 boundary, at the last
    token) and a random row beside them draws only its unmasked tokens; the same seed draws the
    same tokens; over 160 rows of one distribution the frequencies are within 0.1 total
    variation of softmax(logits / T)."""
    import torch

    fn = _entry(target, "temperature_sample", dtype)
    dev = target.platform().device(0)
    dt = getattr(torch, dtype)
    vocab = 20000
    logits = torch.randn(4, vocab, generator=torch.Generator().manual_seed(5))
    logits[0, [5, 19000]] = 9.0
    logits[1, [4095, 4096]] = 9.0
    logits[2, vocab - 1] = 9.0
    live = [3, 8191, vocab - 1]
    logits[3] = float("-inf")
    logits[3, live] = torch.tensor([0.0, 0.3, 0.6])
    temperature = torch.tensor([0.0, 0.0, 0.0, 1.0], device=dev)
    x = logits.to(dt).to(dev)
    got = fn(x, temperature, 99)
    if got.dtype != torch.int64 or tuple(got.shape) != (4,):
        pytest.fail(
            f"temperature_sample returned {got.dtype} {tuple(got.shape)}; want int64 (4,)", pytrace=False
        )
    got = got.cpu().tolist()
    if got[:3] != [5, 4095, vocab - 1]:
        pytest.fail(
            f"greedy rows drew {got[:3]}; the first index of each maximum is [5, 4095, {vocab - 1}]",
            pytrace=False,
        )
    if got[3] not in live:
        pytest.fail(f"a random row drew token {got[3]}, whose logit is -inf (live: {live})", pytrace=False)
    if fn(x, temperature, 99).cpu().tolist() != got:
        pytest.fail("the same logits, temperatures and seed drew different tokens", pytrace=False)

    rows, t = 160, 0.6
    row = torch.full((64,), float("-inf"))
    ids = torch.tensor([2, 33, 63])
    row[ids] = torch.tensor([0.0, 0.6, 1.2])
    row = row.to(dt)
    drawn = fn(row.repeat(rows, 1).to(dev), torch.full((rows,), t, device=dev), 77).cpu()
    counts = torch.bincount(drawn, minlength=64).float()
    if counts.sum() != counts[ids].sum():
        pytest.fail(
            f"tokens with logit -inf were drawn: {sorted(set(drawn.tolist()) - set(ids.tolist()))}",
            pytrace=False,
        )
    want = torch.softmax(row[ids].float() / t, dim=0)
    tv = 0.5 * float((counts[ids] / rows - want).abs().sum())
    if tv > 0.1:
        pytest.fail(
            f"frequencies {(counts[ids] / rows).tolist()} vs softmax(logits / T) {want.tolist()}: "
            f"total variation {tv:.3f} > 0.1",
            pytrace=False,
        )
