"""Running one paged-attention case on the device under test, and checking it.

A case is a backend, a dtype, sizes and a named batch shape. The batch is hostile by
construction (`hallm.ops.testing.make_paged_batch`): shuffled block tables, a never-assigned
null block 0, NaN in every slot that holds no token, padding tokens with slot -1; the output
buffer is pre-filled so unwritten rows show. The kernel runs through its public pieces
(`validate`, `kv_cache_shape`, `build_metadata`, `forward`), like the model runner calls it.
A backend with its own KV-cache layout gets its cached context written by its own `forward`
(a prefill step), since only it knows the layout.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

import numpy as np
import pytest
import torch

from hallm.conformance.cases import KV_CACHE_TORCH_DTYPES, NUM_HEADS, NUM_KV_HEADS, BatchShape, tolerance
from hallm.conformance.diagnose import explain_cache, explain_output, request_of
from hallm.conformance.target import has_default_layout
from hallm.ops.testing import PagedBatch, expected_attention, layout_tensors, make_paged_batch
from hallm.platforms import AttentionBackend, AttentionSpec, BatchLayout

if TYPE_CHECKING:
    from hallm.conformance.target import Target

#: What `out` holds before `forward`: a row still equal to it was never written.
SENTINEL = 1.0e4


def torch_dtype(name: str) -> torch.dtype:
    """The torch dtype of a model or KV-cache dtype name; pytest.skip if torch lacks it."""
    attr = KV_CACHE_TORCH_DTYPES.get(name)
    dtype = getattr(torch, attr, None) if attr else None
    if not isinstance(dtype, torch.dtype):
        pytest.skip(f"the kit cannot build tensors of dtype {name!r} with torch {torch.__version__}")
    return dtype


@dataclasses.dataclass
class AttentionCase:
    """One kernel configuration on one batch shape."""

    backend: type[AttentionBackend]
    dtype: str
    head_size: int
    block_size: int
    shape: BatchShape
    kv_cache_dtype: str = "auto"
    num_heads: int = NUM_HEADS
    num_kv_heads: int = NUM_KV_HEADS
    scale: float | None = None  # None: head_size ** -0.5
    sliding_window: int | None = None
    logits_soft_cap: float | None = None
    sinks: bool = False  # per-head sink logits (`sink_logits`) join every softmax
    noncontiguous: bool = False
    prime_through_backend: bool = False  # write the cached context with the backend itself
    null_out_of_window: bool = False  # blocks outside every query's window -> the null block
    near_uniform: bool = False  # small keys, values near 1: long sums show accumulation error
    seed: int = 0

    @property
    def softmax_scale(self) -> float:
        """The scale the spec carries."""
        return self.scale if self.scale is not None else self.head_size**-0.5

    def sink_logits(self) -> torch.Tensor | None:
        """float32 [num_heads] on the host, or None: from far below the scores (no effect) to
        far above them (the output vanishes), with values in between where both count."""
        if not self.sinks:
            return None
        gen = torch.Generator().manual_seed(self.seed + 99)
        logits = torch.randn(self.num_heads, generator=gen) * 2.0
        logits[0], logits[-1] = -30.0, 30.0
        return logits

    def spec(self) -> AttentionSpec:
        """The layer spec handed to the backend."""
        return AttentionSpec(
            num_heads=self.num_heads,
            num_kv_heads=self.num_kv_heads,
            head_size=self.head_size,
            scale=self.softmax_scale,
            dtype=self.dtype,
            kv_cache_dtype=self.kv_cache_dtype,
            block_size=self.block_size,
            sliding_window=self.sliding_window,
            logits_soft_cap=self.logits_soft_cap,
            sinks=self.sinks,
        )

    def describe(self) -> str:
        """One line naming the configuration, for failure messages."""
        s = self.shape
        extra = "".join(
            [
                f", sliding_window={self.sliding_window}" if self.sliding_window else "",
                f", logits_soft_cap={self.logits_soft_cap}" if self.logits_soft_cap else "",
                f", sinks={[round(x, 3) for x in sinks.tolist()]}"
                if (sinks := self.sink_logits()) is not None
                else "",
                ", non-contiguous q/k/v" if self.noncontiguous else "",
                ", out-of-window blocks replaced by the NaN-filled null block"
                if self.null_out_of_window
                else "",
                ", near-uniform attention over values near 1" if self.near_uniform else "",
            ]
        )
        return (
            f"{self.backend.name}: dtype={self.dtype}, kv_cache_dtype={self.kv_cache_dtype}, "
            f"heads={self.num_heads}/{self.num_kv_heads} kv, head_size={self.head_size}, "
            f"block_size={self.block_size}, scale={self.softmax_scale:.4g}{extra}; batch '{s.name}' "
            f"(query_lens={list(s.query_lens)}, context_lens={list(s.context_lens)}, padding={s.padding})"
        )


@dataclasses.dataclass
class Ran:
    """What one run produced (tensors still on the device)."""

    batch: PagedBatch
    out: torch.Tensor
    result: Any
    cache: torch.Tensor
    before: torch.Tensor | None  # host copy of the cache before forward (default layout only)
    prime: PagedBatch | None  # the priming step, when the backend wrote the context itself


def build_batch(case: AttentionCase, device: torch.device) -> PagedBatch:
    """The hostile batch of `case` on `device`; keys/values rounded through a narrower KV dtype."""
    s = case.shape
    batch = make_paged_batch(
        list(s.query_lens),
        list(s.context_lens),
        num_heads=case.num_heads,
        num_kv_heads=case.num_kv_heads,
        head_size=case.head_size,
        block_size=case.block_size,
        dtype=torch_dtype(case.dtype),
        device=device,
        seed=case.seed,
        num_padding_tokens=s.padding,
    )
    if case.near_uniform:
        _make_near_uniform(batch)
    cache_dtype = torch_dtype(case.spec().cache_dtype)
    if cache_dtype != batch.query.dtype:
        # The kernel stores keys/values rounded to the cache dtype: the answer uses those.
        batch.kv_cache = batch.kv_cache.to(cache_dtype)
        batch.seq_keys = [k.to(cache_dtype).to(k.dtype) for k in batch.seq_keys]
        batch.seq_values = [v.to(cache_dtype).to(v.dtype) for v in batch.seq_values]
    return batch


#: Near-uniform attention: keys shrunk so that every score is close to the others, values
#: spread around 1 so that the output is about 1 and a long sum's rounding does not cancel.
NEAR_UNIFORM_KEY_SCALE = 0.05
NEAR_UNIFORM_VALUE_SPREAD = 0.25


def _make_near_uniform(batch: PagedBatch) -> None:
    """Rewrite the batch's keys and values, in the cache too (NaN poison stays NaN)."""

    def keys(t: torch.Tensor) -> torch.Tensor:
        return (t.float() * NEAR_UNIFORM_KEY_SCALE).to(t.dtype)

    def values(t: torch.Tensor) -> torch.Tensor:
        return (1.0 + NEAR_UNIFORM_VALUE_SPREAD * t.float()).to(t.dtype)

    batch.key, batch.value = keys(batch.key), values(batch.value)
    batch.kv_cache[0], batch.kv_cache[1] = keys(batch.kv_cache[0]), values(batch.kv_cache[1])
    batch.seq_keys = [keys(k) for k in batch.seq_keys]
    batch.seq_values = [values(v) for v in batch.seq_values]


def drop_out_of_window_blocks(batch: PagedBatch, window: int, cache: torch.Tensor | None) -> int:
    """Point every block-table entry wholly outside all of a request's windows at the null block.

    An engine may free such blocks (the contract allows any block id there). Request i's first
    new token sits at position context_lens[i] and attends positions > context_lens[i] - window,
    so table entries k with (k + 1) * block_size <= context_lens[i] - window + 1 are never read.
    With the default layout `cache` is given and the freed blocks are NaN-filled as well.
    Returns how many entries were dropped.
    """
    lay = batch.layout
    bs = lay.block_size
    freed: list[int] = []
    for i in range(lay.num_reqs):
        lowest = int(lay.context_lens[i]) - window + 1  # the lowest position any query reads
        for k in range(max(0, lowest // bs)):
            freed.append(int(lay.block_tables[i, k]))
            lay.block_tables[i, k] = 0
    if lay.tensors is not None:
        device = lay.tensors.block_tables.device
        lay.tensors.block_tables = torch.from_numpy(lay.block_tables).to(device, torch.int32)
    if cache is not None and freed:
        cache[:, freed] = float("nan")
    return len(freed)


def _inputs(batch: PagedBatch, noncontiguous: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    q, k, v = batch.query, batch.key, batch.value
    if not noncontiguous:
        return q, k, v
    # Slices of one fused qkv buffer, as a model's QKV projection produces them (+ 8 spare columns).
    t, h, d = q.shape
    hkv = k.shape[1]
    fused = torch.zeros(t, (h + 2 * hkv) * d + 8, dtype=q.dtype, device=q.device)
    views = (
        fused[:, : h * d].view(t, h, d),
        fused[:, h * d : (h + hkv) * d].view(t, hkv, d),
        fused[:, (h + hkv) * d : (h + 2 * hkv) * d].view(t, hkv, d),
    )
    for view, src in zip(views, (q, k, v), strict=True):
        view.copy_(src)
        assert not view.is_contiguous()
    return views


def prime_context(
    backend: AttentionBackend, batch: PagedBatch, cache: torch.Tensor, sinks: torch.Tensor | None = None
) -> PagedBatch | None:
    """Write every request's cached context into `cache` through the backend (a prefill step)."""
    lay = batch.layout
    reqs = [i for i in range(lay.num_reqs) if lay.context_lens[i] > 0]
    if not reqs:
        return None
    bs = lay.block_size
    ctx = [int(lay.context_lens[i]) for i in reqs]
    slots = [
        int(lay.block_tables[i, p // bs]) * bs + p % bs
        for i, c in zip(reqs, ctx, strict=True)
        for p in range(c)
    ]
    qsl = np.zeros(len(reqs) + 1, dtype=np.int32)
    qsl[1:] = np.cumsum(ctx)
    layout = BatchLayout(
        num_reqs=len(reqs),
        num_tokens=sum(ctx),
        num_prefill_reqs=sum(c > 1 for c in ctx),
        max_query_len=max(ctx),
        max_seq_len=max(ctx),
        query_start_loc=qsl,
        seq_lens=np.asarray(ctx, dtype=np.int32),
        context_lens=np.zeros(len(reqs), dtype=np.int32),
        block_tables=np.ascontiguousarray(lay.block_tables[reqs]),
        slot_mapping=np.asarray(slots, dtype=np.int64),
        block_size=bs,
    )
    device = cache.device
    layout.tensors = layout_tensors(layout, device)
    keys = [batch.seq_keys[i][:c] for i, c in zip(reqs, ctx, strict=True)]
    values = [batch.seq_values[i][:c] for i, c in zip(reqs, ctx, strict=True)]
    gen = torch.Generator().manual_seed(1234)
    query = torch.randn(sum(ctx), *batch.query.shape[1:], generator=gen).to(batch.query.dtype)
    prime = PagedBatch(
        query=query.to(device),
        key=torch.cat(keys).to(device),
        value=torch.cat(values).to(device),
        kv_cache=cache,
        layout=layout,
        seq_keys=keys,
        seq_values=values,
    )
    out = torch.empty_like(prime.query)
    _forward(
        backend,
        (prime.query, prime.key, prime.value),
        cache,
        type(backend).build_metadata(layout),
        out,
        sinks,
    )
    return prime


def _forward(
    backend: AttentionBackend,
    qkv: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    cache: torch.Tensor,
    metadata: Any,
    out: torch.Tensor,
    sinks: torch.Tensor | None,
) -> Any:
    """`backend.forward`, with the sink logits (a keyword) only for a layer that has sinks."""
    if sinks is None:
        return backend.forward(*qkv, cache, metadata, out)
    forward: Any = backend.forward
    return forward(*qkv, cache, metadata, out, sinks=sinks)


def run_case(target: Target, case: AttentionCase) -> Ran:
    """Validate the spec, build the batch and cache, run `forward` once on the device."""
    spec = case.spec()
    reasons = case.backend.validate(spec)
    if reasons:
        pytest.fail(
            f"{case.backend.name} declares this configuration but validate() refuses it: "
            f"{'; '.join(reasons)} [{case.describe()}]",
            pytrace=False,
        )
    platform = target.platform()
    device = platform.device(0)
    batch = build_batch(case, device)
    backend = case.backend(spec)
    host_sinks = case.sink_logits()
    sinks = None if host_sinks is None else host_sinks.to(device)
    before: torch.Tensor | None = None
    prime: PagedBatch | None = None
    if has_default_layout(case.backend) and not case.prime_through_backend:
        cache = batch.kv_cache
    else:
        shape = case.backend.kv_cache_shape(
            batch.kv_cache.shape[1], case.block_size, case.num_kv_heads, case.head_size
        )
        cache = torch.full(tuple(shape), float("nan"), dtype=batch.kv_cache.dtype, device=device)
        prime = prime_context(backend, batch, cache, sinks)
        platform.synchronize()
    if case.null_out_of_window:
        if case.sliding_window is None:
            raise ValueError("null_out_of_window needs a sliding window")
        default = has_default_layout(case.backend)
        if not drop_out_of_window_blocks(batch, case.sliding_window, cache if default else None):
            pytest.skip(f"not applicable: no block lies outside the window at block size {case.block_size}")
    if has_default_layout(case.backend):
        before = cache.cpu().clone()
    query, key, value = _inputs(batch, case.noncontiguous)
    out = torch.full_like(batch.query, SENTINEL)
    metadata = case.backend.build_metadata(batch.layout)
    result = _forward(backend, (query, key, value), cache, metadata, out, sinks)
    platform.synchronize()
    return Ran(batch=batch, out=out, result=result, cache=cache, before=before, prime=prime)


def check_case(case: AttentionCase, ran: Ran) -> None:
    """Fail with findings unless the cache and the output are right."""
    header = case.describe()
    if ran.result is not ran.out and not (
        isinstance(ran.result, torch.Tensor) and ran.result.data_ptr() == ran.out.data_ptr()
    ):
        pytest.fail(f"forward must write into the `out` it is given and return it [{header}]", pytrace=False)
    if ran.prime is not None and ran.before is not None:
        # The backend wrote the context itself into an all-NaN cache: read that back first
        # (`before` was copied right after the priming step).
        empty = torch.full_like(ran.before, float("nan"))
        _fail_on_cache(f"priming prefill, {header}", ran.prime, empty, ran.before)
    if ran.before is not None:
        _fail_on_cache(header, ran.batch, ran.before, ran.cache.cpu())
    atol, rtol = tolerance(case.dtype, case.kv_cache_dtype)
    expected = expected_attention(
        ran.batch, case.softmax_scale, case.sliding_window, case.logits_soft_cap, case.sink_logits()
    )
    n = ran.batch.num_real_tokens
    out_host = ran.out.cpu()
    got = out_host.double()
    padding = padding_rows_finding(out_host, n)
    diff = (got[:n] - expected[:n]).abs()
    limit = atol + rtol * expected[:n].abs()
    if bool(torch.isfinite(got[:n]).all()) and bool((diff <= limit).all()):
        if padding:
            pytest.fail(f"{padding} [{header}]", pytrace=False)
        return
    worst = int(torch.nan_to_num(diff - limit, nan=float("inf")).flatten().argmax())
    t, h = worst // (diff.shape[1] * diff.shape[2]), (worst // diff.shape[2]) % diff.shape[1]
    req, pos = request_of(ran.batch, t)
    unwritten = (out_host == torch.tensor(SENTINEL, dtype=out_host.dtype)).all(dim=2).all(dim=1)
    findings = explain_output(
        ran.batch,
        got,
        expected,
        case.softmax_scale,
        atol,
        unwritten=unwritten,
        sliding_window=case.sliding_window,
        logits_soft_cap=case.logits_soft_cap,
        null_blocks=case.null_out_of_window,
    )
    if case.sinks:
        plain = expected_attention(ran.batch, case.softmax_scale, case.sliding_window, case.logits_soft_cap)
        if bool(((got[:n] - plain[:n]).abs() <= atol + rtol * plain[:n].abs()).all()):
            findings.insert(
                0,
                "the output equals attention WITHOUT the sink logits: `sinks` is ignored (each head's "
                "sink logit must join its softmax denominator, AttentionSpec.sinks)",
            )
    if not any(not f.startswith("wrong requests:") for f in findings):
        b = case.backend.name
        findings.append(
            "no single cause found; the tests that isolate one property of this configuration: "
            f"test_block_table_walk[{b}-{case.dtype}-b{case.block_size}] (blocks and in-block offsets), "
            f"test_softmax_scale[{b}-{case.dtype}], test_gqa_head_mapping[{b}-{case.dtype}-*]"
        )
    if padding:
        findings.append(padding)
    message = (
        f"attention output differs from hallm.ops.reference: max error {float(diff.max()):.3g} "
        f"(atol {atol:g}, rtol {rtol:g}); worst at token {t} (request {req}, position {pos}), head {h}\n"
        f"  case: {header}\n" + "".join(f"  - {f}\n" for f in findings)
    )
    pytest.fail(message, pytrace=False)


def padding_rows_finding(out: torch.Tensor, num_real_tokens: int) -> str | None:
    """What is wrong with the padding rows of `out` (host), or None when they are all zero."""
    pad = out[num_real_tokens:]
    if pad.numel() == 0 or bool((pad == 0).all()):
        return None
    rows = [str(num_real_tokens + r) for r in (pad != 0).flatten(1).any(dim=1).nonzero().flatten().tolist()]
    unwritten = bool((pad == torch.tensor(SENTINEL, dtype=pad.dtype)).all())
    held = f"the kit's fill value {SENTINEL:g}: never written" if unwritten else "non-zero values"
    return (
        f"padding rows {', '.join(rows)} of `out` (tokens t >= query_start_loc[-1], slot -1) hold {held}; "
        "forward must zero the rows of padding tokens (AttentionBackend.forward)"
    )


def _fail_on_cache(header: str, batch: PagedBatch, before: torch.Tensor, after: torch.Tensor) -> None:
    findings = explain_cache(batch, before, after, batch.key.cpu(), batch.value.cpu())
    if findings:
        pytest.fail(
            f"KV cache write is wrong [{header}]\n" + "".join(f"  - {f}\n" for f in findings), pytrace=False
        )
