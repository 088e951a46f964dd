"""Turning a wrong answer into a pointer at the fault.

When a kernel's output or cache differs from the reference, these functions test hypotheses
about why, cheapest first, and say which hold: rows of `out` never written; results that read
NaN-poisoned slots (a block-table walk or length bound that strays outside the request);
query heads reading the wrong KV head (GQA mapping); a softmax scale other than
`AttentionSpec.scale` (fitted); a wrong mask, window, soft cap, length bound or request
(`hallm.conformance.alternatives`); keys/values written anywhere but `slot_mapping`. Each finding
is a sentence a kernel author can act on. Everything runs on the host in float64.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from hallm.conformance.alternatives import explain_alternatives
from hallm.ops.reference import dense_causal_attention
from hallm.ops.testing import PagedBatch

#: How many examples a finding lists before "...".
EXAMPLES = 4


def request_of(batch: PagedBatch, token: int) -> tuple[int, int]:
    """(request index, sequence position) of packed token `token`."""
    qsl = batch.layout.query_start_loc
    for i in range(batch.layout.num_reqs):
        if qsl[i] <= token < qsl[i + 1]:
            return i, int(batch.layout.context_lens[i]) + token - int(qsl[i])
    return -1, -1


def describe_request(batch: PagedBatch, i: int) -> str:
    """ "request 2 (chunked prefill: 13 cached + 10 new tokens)"."""
    ctx = int(batch.layout.context_lens[i])
    new = int(batch.layout.query_start_loc[i + 1] - batch.layout.query_start_loc[i])
    kind = "decode" if new == 1 and ctx else "prefill" if ctx == 0 else "chunked prefill"
    return f"request {i} ({kind}: {ctx} cached + {new} new tokens)"


def _examples(items: Sequence[str]) -> str:
    shown = ", ".join(items[:EXAMPLES])
    return shown + (f", ... ({len(items)} in all)" if len(items) > EXAMPLES else "")


# ---- the output ------------------------------------------------------------------------------


def explain_output(
    batch: PagedBatch,
    out: torch.Tensor,
    expected: torch.Tensor,
    scale: float,
    atol: float,
    *,
    unwritten: torch.Tensor | None = None,
    sliding_window: int | None = None,
    logits_soft_cap: float | None = None,
    null_blocks: bool = False,
) -> list[str]:
    """Findings about a wrong `out` (host float64, real tokens only), most specific first.

    null_blocks: the batch's out-of-window blocks were replaced by the NaN-filled null block.
    """
    n = batch.num_real_tokens
    o, e = out[:n], expected[:n]
    findings: list[str] = []
    if unwritten is not None and bool(unwritten[:n].any()):
        rows = [str(t) for t in unwritten[:n].nonzero().flatten().tolist()]
        findings.append(
            f"forward did not write rows {_examples(rows)} of `out` (they still hold the kit's fill "
            "value): every real token's row must be written"
        )
    bad_rows = ~torch.isfinite(o).all(dim=(1, 2))
    if bool(bad_rows.any()):
        toks = bad_rows.nonzero().flatten().tolist()
        by_req: dict[int, int] = {}
        for t in toks:
            by_req[request_of(batch, t)[0]] = by_req.get(request_of(batch, t)[0], 0) + 1
        where = [f"{describe_request(batch, i)}: {k} token(s)" for i, k in sorted(by_req.items())]
        if null_blocks:
            findings.append(
                f"the output is NaN/Inf for {len(toks)} of {n} tokens, in {_examples(where)}. The kit pointed "
                "the block-table entries wholly outside every query's sliding window at the null block 0, "
                "NaN-filled, as an engine may once it frees them: keys/values at positions no query attends "
                "must not reach the result. Skip those blocks, or zero what they load before any "
                "arithmetic: masking their scores alone does not stop NaN (NaN * 0 is NaN)"
            )
            return findings
        findings.append(
            f"the output is NaN/Inf for {len(toks)} of {n} tokens, in {_examples(where)}. The kit fills every "
            "cache slot that holds none of a request's tokens with NaN (the null block 0, unused slots of "
            "the last block, unassigned blocks), so the kernel read outside the request's sequence: check "
            "the block-table walk (position p lives in block_tables[i, p // block_size] at offset "
            "p % block_size; test_block_table_walk isolates it), the bound seq_lens[i], and that this "
            "step's keys are written before they are read"
        )
        return findings
    err = (o - e).abs().amax(dim=(1, 2))
    per_req = []
    for i in range(batch.layout.num_reqs):
        lo, hi = int(batch.layout.query_start_loc[i]), int(batch.layout.query_start_loc[i + 1])
        if hi > lo:
            per_req.append((float(err[lo:hi].max()), i))
    wrong = [f"{describe_request(batch, i)}: max error {m:.3g}" for m, i in per_req if m > atol]
    right = [describe_request(batch, i) for m, i in per_req if m <= atol]
    if wrong:
        findings.append(
            "wrong requests: "
            + "; ".join(wrong[:EXAMPLES])
            + (f"; correct: {_examples(right)}" if right else "; no request is correct")
        )
    heads = gqa_mapping(batch, o, scale, atol, sliding_window, logits_soft_cap)
    if heads is not None:
        findings.append(heads)
        return findings
    fitted = fit_scale(batch, o, scale, atol, sliding_window, logits_soft_cap)
    if fitted is not None:
        findings.append(fitted)
        return findings
    wrong_reqs = [i for m, i in per_req if m > atol]
    other = explain_alternatives(batch, out, scale, atol, wrong_reqs, sliding_window, logits_soft_cap)
    if other is not None:
        findings.append(other)
    return findings


def _rows_of(batch: PagedBatch, i: int) -> tuple[int, int]:
    return int(batch.layout.query_start_loc[i]), int(batch.layout.query_start_loc[i + 1])


def _probe_requests(batch: PagedBatch, limit: int = 2) -> list[int]:
    """The requests with the most keys (the most informative), at most `limit`."""
    reqs = [i for i in range(batch.layout.num_reqs) if _rows_of(batch, i)[1] > _rows_of(batch, i)[0]]
    return sorted(reqs, key=lambda i: -int(batch.layout.seq_lens[i]))[:limit]


def gqa_mapping(
    batch: PagedBatch,
    out: torch.Tensor,
    scale: float,
    atol: float,
    sliding_window: int | None = None,
    logits_soft_cap: float | None = None,
) -> str | None:
    """If every query head matches attention over some KV head, but not h // group: say which."""
    num_heads, num_kv = batch.query.shape[1], batch.seq_keys[0].shape[1]
    if num_kv == 1:
        return None  # every query head reads the one KV head
    group = num_heads // num_kv
    observed: list[int] = []
    query = batch.query.cpu()
    for h in range(num_heads):
        best: tuple[float, int] | None = None
        for j in range(num_kv):
            worst = 0.0
            for i in _probe_requests(batch):
                lo, hi = _rows_of(batch, i)
                alt = dense_causal_attention(
                    query[lo:hi, h : h + 1],
                    batch.seq_keys[i][:, j : j + 1],
                    batch.seq_values[i][:, j : j + 1],
                    scale,
                    sliding_window=sliding_window,
                    logits_soft_cap=logits_soft_cap,
                )
                worst = max(worst, float((alt[:, 0] - out[lo:hi, h]).abs().max()))
            if best is None or worst < best[0]:
                best = (worst, j)
        assert best is not None
        if best[0] > atol:
            return None  # some head matches no KV head: not a mapping problem
        observed.append(best[1])
    wanted = [h // group for h in range(num_heads)]
    if observed == wanted:
        return None
    pattern = ""
    if observed == [h % num_kv for h in range(num_heads)]:
        pattern = " (h % num_kv_heads: KV heads interleaved)"
    return (
        f"wrong GQA head mapping: query head h reads KV head {observed}{pattern}, but must read "
        f"h // (num_heads // num_kv_heads) = {wanted} (num_heads={num_heads}, num_kv_heads={num_kv}): "
        "the query heads that share a KV head are adjacent"
    )


def fit_scale(
    batch: PagedBatch,
    out: torch.Tensor,
    scale: float,
    atol: float,
    sliding_window: int | None = None,
    logits_soft_cap: float | None = None,
) -> str | None:
    """If the output matches attention with some other softmax scale, say which."""
    reqs = [i for i in _probe_requests(batch, limit=1) if int(batch.layout.seq_lens[i]) > 1]
    if not reqs:
        return None
    i = reqs[0]
    lo, hi = _rows_of(batch, i)
    lo = max(lo, hi - 4)  # the last few queries: they see the most keys
    query = batch.query.cpu()[lo:hi].double()  # [Q, H, D]
    head_size = query.shape[-1]
    keys, values = batch.seq_keys[i].double(), batch.seq_values[i].double()  # [S, Hkv, D]
    group = query.shape[1] // keys.shape[1]
    keys, values = keys.repeat_interleave(group, dim=1), values.repeat_interleave(group, dim=1)
    raw = torch.einsum("qhd,shd->hqs", query, keys)  # [H, Q, S]: q.k before any scale
    seq, q_len = keys.shape[0], query.shape[0]
    q_pos = torch.arange(seq - q_len, seq)[:, None]
    k_pos = torch.arange(seq)[None, :]
    allowed = k_pos <= q_pos
    if sliding_window is not None:
        allowed &= k_pos > q_pos - sliding_window
    target = out[lo:hi]

    def errors(scales: list[float]) -> list[tuple[float, float]]:
        """(max error, scale) of attention at each scale, 32 scales per batched pass."""
        found: list[tuple[float, float]] = []
        for start in range(0, len(scales), 32):
            chunk = scales[start : start + 32]
            s = torch.tensor(chunk, dtype=torch.float64)[:, None, None, None]
            logits = raw[None] * s  # [N, H, Q, S]
            if logits_soft_cap is not None:
                logits = logits_soft_cap * torch.tanh(logits / logits_soft_cap)
            probs = torch.softmax(logits.masked_fill(~allowed, -math.inf), dim=-1)
            alt = torch.einsum("nhqs,shd->nqhd", probs, values)
            err = (alt - target[None]).abs().flatten(1).amax(dim=1)
            found += zip(err.tolist(), chunk, strict=True)
        return found

    named = {
        "1": 1.0,
        "1/head_size": 1.0 / head_size,
        "1/sqrt(head_size)": head_size**-0.5,
        "scale**2": scale**2,
        "sqrt(scale)": math.sqrt(scale),
        "2*scale": 2 * scale,
        "scale/2": scale / 2,
        "1/scale": 1 / scale,
        "sqrt(head_size)": math.sqrt(head_size),
    }
    grid = [10 ** (k / 20) for k in range(-80, 41)]  # 1e-4 .. 1e2
    best_err, best = min(errors([*named.values(), *grid]))
    for _ in range(3):  # refine around the best point
        best_err, best = min(errors([best * 10 ** (k / 400) for k in range(-20, 21)]))
    if best_err > 2 * atol or abs(best / scale - 1) < 1e-2:
        return None
    name = next((n for n, v in named.items() if abs(best / v - 1) < 2e-2), None)
    label = f"{best:.4g}" + (f" (= {name})" if name else "")
    return (
        f"wrong softmax scale: the output matches attention with scale {label} (max error {best_err:.2g}), "
        f"not AttentionSpec.scale = {scale:.4g}: multiply q.k by spec.scale, once"
    )


# ---- the cache -------------------------------------------------------------------------------


def _bits(t: torch.Tensor) -> torch.Tensor:
    """Bit patterns, so that NaN == NaN and -0.0 != 0.0 (the cache must hold exact copies)."""
    ints = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()]
    return t.contiguous().view(ints)


def explain_cache(
    batch: PagedBatch,
    before: torch.Tensor,
    after: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
) -> list[str]:
    """Findings about the KV write of one step (default cache layout, host tensors).

    before/after: [2, num_blocks, block_size, num_kv_heads, head_size]. Token t's key and value
    must be exactly at flat slot slot_mapping[t]; padding tokens (slot < 0) are not written;
    no other slot changes.
    """
    nkv, hd = after.shape[3], after.shape[4]
    flat_b, flat_a = _bits(before.view(2, -1, nkv, hd)), _bits(after.view(2, -1, nkv, hd))
    keys, values = _bits(key.to(after.dtype)), _bits(value.to(after.dtype))
    slots = [int(s) for s in batch.layout.slot_mapping]
    block_size = after.shape[2]
    misplaced: list[str] = []
    offsets: set[int] = set()
    swapped = 0
    for t, s in enumerate(slots):
        if s < 0:
            continue
        if torch.equal(flat_a[0, s], keys[t]) and torch.equal(flat_a[1, s], values[t]):
            continue
        if torch.equal(flat_a[1, s], keys[t]):
            swapped += 1
        found = (flat_a[0] == keys[t]).all(dim=(1, 2)).nonzero().flatten().tolist()
        i, pos = request_of(batch, t)
        where = f"found at slot {found[0]}" if found else "not found anywhere in the cache"
        misplaced.append(
            f"token {t} (request {i}, position {pos}) belongs in slot {s} (block {s // block_size}, "
            f"offset {s % block_size}), {where}"
        )
        if found:
            offsets.add(found[0] - t)
    findings: list[str] = []
    if misplaced:
        hint = ""
        if swapped:
            hint = "; keys were written to the value half: index 0 of the cache is keys, 1 values"
        elif offsets == {0}:
            hint = "; token t went to flat slot t: the write ignores slot_mapping"
        elif len(offsets) == 1:
            hint = f"; every token went {offsets.pop()} slots away from slot_mapping[t]"
        findings.append(
            f"KV write: {len(misplaced)} of {sum(s >= 0 for s in slots)} tokens are not at slot_mapping[t]: "
            f"{_examples(misplaced)}{hint}"
        )
    touched = set(slots)
    changed = (flat_a != flat_b).flatten(2).any(dim=2).any(dim=0).nonzero().flatten().tolist()
    stray = [s for s in changed if s not in touched]
    if stray:
        pads = [t for t, s in enumerate(slots) if s < 0]
        pad_hit = any(bool((flat_a[0, stray] == keys[t]).all(dim=(1, 2)).any()) for t in pads)
        why = " (padding tokens, slot -1, were written)" if pad_hit else ""
        findings.append(
            f"KV write: {len(stray)} slots changed that no token maps to{why}: slots {_examples([str(s) for s in stray])} "
            f"(blocks {sorted({s // block_size for s in stray})[:EXAMPLES]})"
        )
    return findings
