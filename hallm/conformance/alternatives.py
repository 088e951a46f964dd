"""Which wrong attention did the kernel compute? Masks, windows, caps, lengths, other requests.

When a kernel's output is wrong but finite, and neither the GQA mapping nor the softmax scale
explains it, each hypothesis here recomputes the wrong requests' attention the way a common
bug would (no causal mask, a mask shifted by one position, the sliding window or the soft cap
ignored or off by one, keys past a power-of-two length dropped, another request's keys read)
and says which one reproduces the output. Host float64, a few rows per request, so a
diagnosis stays cheap even over 8k keys.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import torch

from hallm.ops.testing import PagedBatch

#: At most this many wrong requests are examined, and these rows of each (first and last ones:
#: a mask bug shows in the first rows of a prefill, a length bug in the last).
MAX_REQUESTS = 3
FIRST_ROWS, LAST_ROWS = 3, 2

#: allowed(q_pos [Q, 1], k_pos [1, S]) -> bool [Q, S]: the positions a query attends.
Mask = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclasses.dataclass(frozen=True)
class Hypothesis:
    """One way to get attention wrong, and the advice that fixes it."""

    finding: str
    allowed: Mask
    soft_cap: float | None


def attend(
    query: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    scale: float,
    allowed: torch.Tensor,
    soft_cap: float | None,
) -> torch.Tensor:
    """Float64 attention. query [Q, H, D]; keys/values [S, Hkv, D]; allowed [Q, S] -> [Q, H, D].

    Rows that attend to nothing come out zero.
    """
    group = query.shape[1] // keys.shape[1]
    k = keys.double().repeat_interleave(group, dim=1)
    v = values.double().repeat_interleave(group, dim=1)
    scores = torch.einsum("qhd,shd->hqs", query.double(), k) * scale
    if soft_cap is not None:
        scores = soft_cap * torch.tanh(scores / soft_cap)
    scores = scores.masked_fill(~allowed[None], -math.inf)
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)
    return torch.einsum("hqs,shd->qhd", probs, v)


def _rows(batch: PagedBatch, i: int) -> list[int]:
    """Packed token indices of request i worth examining (its first and last few)."""
    lo, hi = int(batch.layout.query_start_loc[i]), int(batch.layout.query_start_loc[i + 1])
    picked = [*range(lo, min(hi, lo + FIRST_ROWS)), *range(max(lo, hi - LAST_ROWS), hi)]
    return sorted(set(picked))


def _positions(batch: PagedBatch, i: int, rows: list[int]) -> torch.Tensor:
    start, ctx = int(batch.layout.query_start_loc[i]), int(batch.layout.context_lens[i])
    return torch.tensor([ctx + t - start for t in rows])[:, None]


def _error(
    batch: PagedBatch,
    out: torch.Tensor,
    i: int,
    scale: float,
    allowed: Mask,
    soft_cap: float | None,
    source: int | None = None,
) -> float:
    """Max error between `out` and attention of request i's rows under `allowed`, reading the
    keys/values of request `source` (default: i)."""
    rows = _rows(batch, i)
    j = i if source is None else source
    keys, values = batch.seq_keys[j], batch.seq_values[j]
    q_pos = _positions(batch, i, rows)
    k_pos = torch.arange(keys.shape[0])[None, :]
    alt = attend(batch.query.cpu()[rows], keys, values, scale, allowed(q_pos, k_pos), soft_cap)
    return float((alt - out[rows]).abs().max())


def _hypotheses(batch: PagedBatch, sliding_window: int | None, soft_cap: float | None) -> list[Hypothesis]:
    w = sliding_window

    def window(q: torch.Tensor, k: torch.Tensor, size: int | None) -> torch.Tensor:
        return (k > q - size) if size is not None else torch.ones_like(k > q)

    found = [
        Hypothesis(
            "no causal mask: each new token attends to every position of its request, later ones "
            "included; mask key positions above the token's own (context_lens[i] + j)",
            lambda q, k: window(q, k, w),
            soft_cap,
        ),
        Hypothesis(
            "causal mask shifted by +1: each token also attends to the next position; allow "
            "positions up to its own (context_lens[i] + j), not one further",
            lambda q, k: (k <= q + 1) & window(q, k, w),
            soft_cap,
        ),
        Hypothesis(
            "causal mask shifted by -1: each token misses its own key; allow positions <= its own "
            "(the key written this step included)",
            lambda q, k: (k <= q - 1) & window(q, k, w),
            soft_cap,
        ),
    ]
    if w is not None:
        found += [
            Hypothesis(
                f"sliding window ignored: the output is full causal attention, but spec.sliding_window={w} "
                f"limits position p to positions (p - {w}, p]",
                lambda q, k: k <= q,
                soft_cap,
            ),
            Hypothesis(
                f"sliding window one too wide: position p attends (p - {w + 1}, p]; the window is "
                f"(p - {w}, p], {w} positions including p",
                lambda q, k: (k <= q) & window(q, k, w + 1),
                soft_cap,
            ),
            Hypothesis(
                f"sliding window one too narrow: position p attends (p - {w - 1}, p]; the window is "
                f"(p - {w}, p], {w} positions including p",
                lambda q, k: (k <= q) & window(q, k, max(1, w - 1)),
                soft_cap,
            ),
        ]
    if soft_cap is not None:
        found.append(
            Hypothesis(
                f"soft cap ignored: the logits were not capped; with spec.logits_soft_cap={soft_cap:g} "
                f"they become {soft_cap:g} * tanh(logits / {soft_cap:g}) before the softmax",
                lambda q, k: (k <= q) & window(q, k, w),
                None,
            )
        )

    def truncated(bound: int) -> Mask:
        return lambda q, k: (k <= q) & (k < bound) & window(q, k, w)

    longest = max(int(s) for s in batch.layout.seq_lens)
    bound = 1 << max(0, longest.bit_length() - 1)
    while bound >= 16:
        if bound < longest:
            found.append(
                Hypothesis(
                    f"keys past position {bound} are dropped: the output is attention over the first "
                    f"{bound} positions only; loop over all seq_lens[i] positions (no fixed maximum)",
                    truncated(bound),
                    soft_cap,
                )
            )
        bound //= 2
    return found


def explain_alternatives(
    batch: PagedBatch,
    out: torch.Tensor,
    scale: float,
    atol: float,
    wrong: list[int],
    sliding_window: int | None = None,
    soft_cap: float | None = None,
) -> str | None:
    """The first hypothesis that reproduces every wrong request's output, or None.

    out: host float64 [num_tokens, num_heads, head_size]; wrong: indices of wrong requests.
    """
    wrong = sorted(wrong, key=lambda i: -int(batch.layout.seq_lens[i]))[:MAX_REQUESTS]
    if not wrong:
        return None
    tol = 2 * atol

    def right(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        allowed = k <= q
        return allowed & (k > q - sliding_window) if sliding_window is not None else allowed

    for hyp in _hypotheses(batch, sliding_window, soft_cap):
        errors = [_error(batch, out, i, scale, hyp.allowed, hyp.soft_cap) for i in wrong]
        if max(errors) <= tol:
            return hyp.finding
    # Requests mixed: request i's rows match attention over another request's keys/values.
    sources: dict[int, int] = {}
    for i in wrong:
        for j in range(batch.layout.num_reqs):
            if j != i and _error(batch, out, i, scale, right, soft_cap, source=j) <= tol:
                sources[i] = j
                break
    if sources and len(sources) == len(wrong):
        pairs = ", ".join(f"request {i} read request {j}'s" for i, j in sorted(sources.items()))
        return (
            f"requests mixed in the batch: {pairs} keys/values; each request must use its own "
            "block_tables[i], seq_lens[i] and context_lens[i] (check how a query token finds its "
            "request: query_start_loc[i] <= t < query_start_loc[i + 1])"
        )
    return None
