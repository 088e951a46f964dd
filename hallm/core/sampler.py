"""The Sampler: logits [N, V] -> one token per row (+ logprobs), in torch on any device.

Pipeline, in vLLM's order:
  1. raw logprobs = log_softmax(logits)            (only when some row asks for logprobs)
  2. logit_bias, min_tokens mask, penalties         (penalties.py; greedy rows included)
     and the grammar's token mask of structured-output rows (structured_output/)
  3. greedy rows: argmax
  4. random rows: temperature -> min_p -> top-k/top-p -> softmax -> exponential race
  5. gather the sampled token's logprob, rank and the top-k from the raw logprobs

A platform may draw the rows of a step that only use temperature with its own one-pass kernel
(`OpTable.temperature_sample`); every other step runs the torch code here. Random sampling is
exact either way it is drawn: on accelerators by the exponential race
(argmax(p / E), E ~ Exponential(1) i.i.d.: elementwise, no scan), on the CPU by inverse CDF (one
uniform per row against the row's cumulative sum; there, drawing [N, V] uniforms cost more than
the rest of the sampler). Each seeded row draws from its own generator, so a seeded request's
tokens do not depend on the rest of the batch. Stages
no row needs are skipped using host-side flags from SamplingMetadata; nothing here reads a
device value back (no sync) until the caller copies the result.
"""

from __future__ import annotations

import dataclasses
import random

import torch

from hallm.core.logprobs import LogprobsTensors, compute_logprobs, compute_prompt_logprobs, gather_logprobs
from hallm.core.penalties import apply_logit_bias, apply_min_tokens, apply_penalties
from hallm.core.sampling_metadata import (
    RequestSamplingState,
    SamplingMetadata,
    draws_inverse_cdf,
    seeded_row_draw,
)
from hallm.core.structured_output import BitmaskStaging, apply_token_bitmask
from hallm.platforms.ops import TemperatureSampleOp

__all__ = [
    "LogprobsTensors",
    "RequestSamplingState",
    "Sampler",
    "SamplerOutput",
    "SamplingMetadata",
    "apply_min_p",
    "apply_top_k_only",
    "apply_top_k_top_p",
    "apply_top_p_within_top_k",
    "compute_prompt_logprobs",
    "random_sample",
]

_NEG_INF = float("-inf")
_CDF_CHUNK = 1024  # tokens per chunk of the two-level inverse CDF (`_inverse_cdf_sample`)
# With top-k on every top-p row and k up to this, top-p works on topk(k) values instead of sorting
# the whole vocabulary (several times faster at V=150k; beyond this topk is no cheaper than sort).
_MAX_K_WITHOUT_SORT = 4096


@dataclasses.dataclass
class SamplerOutput:
    """sampled_token_ids: LongTensor [N]; logprobs: None unless some row asked for logprobs."""

    sampled_token_ids: torch.Tensor
    logprobs: LogprobsTensors | None


class Sampler:
    """Samples one token per row. One instance serves every step; it keeps no per-request state,
    only the host buffers grammar masks are staged in (pinned with `pin_memory`, so that their
    copy to the device does not wait for the host).

    The caller's logits are never modified (the first in-place stage works on a copy).
    """

    def __init__(
        self, pin_memory: bool = False, temperature_sample: TemperatureSampleOp | None = None
    ) -> None:
        self._mask_staging = BitmaskStaging(pin_memory)
        # The platform's one-pass sampler for temperature-only rows (`OpTable.temperature_sample`),
        # seeded afresh each step from a stream that follows torch's seed (`Platform.manual_seed`).
        self._temperature_sample = temperature_sample
        self._seeds = random.Random(torch.initial_seed())

    def __call__(self, logits: torch.Tensor, meta: SamplingMetadata) -> SamplerOutput:
        """logits: [N, V] (any float dtype; processed in float32), rows in `meta`'s order."""
        if logits.dim() != 2 or logits.shape[0] != meta.num_reqs:
            raise ValueError(
                f"logits must be [num_reqs={meta.num_reqs}, vocab], got shape {tuple(logits.shape)}"
            )
        if logits.shape[1] != meta.vocab_size:
            raise ValueError(
                f"logits vocab dimension {logits.shape[1]} != SamplingMetadata.vocab_size {meta.vocab_size}"
            )
        processed = not (
            meta.logit_bias is None
            and meta.min_tokens_mask is None
            and meta.no_penalties
            and not meta.grammar_rows
        )
        if meta.all_greedy and meta.max_num_logprobs is None and not processed:
            # Nothing changes the logits: argmax in their own dtype (the float32 copy that the
            # general path makes is exact, so the pick is the same) saves a pass over [N, V].
            return SamplerOutput(sampled_token_ids=logits.argmax(dim=-1), logprobs=None)
        raw_logprobs = compute_logprobs(logits) if meta.max_num_logprobs is not None else None
        if processed:
            logits = self._process(logits, meta)
        if self._races(meta):
            # Unprocessed logits go in their own dtype: the op reads them once, in float32.
            sampled = self._race(logits, meta)
        else:
            sampled = self.sample(logits.to(torch.float32), meta)

        logprobs = None
        if raw_logprobs is not None:
            assert meta.max_num_logprobs is not None
            logprobs = gather_logprobs(raw_logprobs, meta.max_num_logprobs, sampled)
        return SamplerOutput(sampled_token_ids=sampled, logprobs=logprobs)

    def _process(self, logits: torch.Tensor, meta: SamplingMetadata) -> torch.Tensor:
        """Logit bias, min_tokens, penalties and grammar masks: [N, V] -> [N, V] float32 (a
        new tensor: the caller's logits are never modified)."""
        owned = logits.dtype != torch.float32  # a dtype conversion makes a private copy
        logits = logits.to(torch.float32)
        logits, owned = apply_logit_bias(logits, meta, owned)
        logits, owned = apply_min_tokens(logits, meta, owned)
        owned = owned or not meta.no_penalties  # penalties return a new tensor
        logits = apply_penalties(logits, meta)
        if meta.grammar_rows:
            if not owned:
                logits = logits.clone()
            rows, mask = meta.grammar_mask(logits.device, self._mask_staging)
            logits = apply_token_bitmask(logits, rows, mask)
        return logits

    def _races(self, meta: SamplingMetadata) -> bool:
        """Whether this step's rows go to the platform's `temperature_sample`: some row samples,
        none truncates the distribution (top-k, top-p, min-p), and none is seeded (a seeded row
        draws from its own generator, so that its tokens do not depend on the batch)."""
        return (
            self._temperature_sample is not None
            and not meta.all_greedy
            and meta.no_top_k
            and meta.no_top_p
            and meta.no_min_p
            and not meta.generators
        )

    def _race(self, logits: torch.Tensor, meta: SamplingMetadata) -> torch.Tensor:
        assert self._temperature_sample is not None and meta.temperature is not None
        temperature = meta.temperature  # 1.0 on greedy rows; the op takes 0 there
        if meta.is_greedy is not None:
            temperature = temperature.masked_fill(meta.is_greedy, 0.0)
        return self._temperature_sample(logits, temperature, self._seeds.getrandbits(31))

    def sample(self, logits: torch.Tensor, meta: SamplingMetadata) -> torch.Tensor:
        """[N, V] float32 processed logits -> [N] long token ids (greedy and random rows mixed)."""
        greedy = None if meta.all_random else logits.argmax(dim=-1)
        if meta.all_greedy:
            assert greedy is not None
            return greedy

        assert meta.temperature is not None
        # Out of place: from here on `logits` is ours to modify.
        logits = logits / meta.temperature.unsqueeze(1)
        if not meta.no_min_p:
            assert meta.min_p is not None
            logits = apply_min_p(logits, meta.min_p)
        if not meta.no_top_p:
            if meta.top_p_within_top_k and meta.max_top_k <= _MAX_K_WITHOUT_SORT:
                assert meta.top_k is not None and meta.top_p is not None
                logits = apply_top_p_within_top_k(logits, meta.top_k, meta.max_top_k, meta.top_p)
            else:
                logits = apply_top_k_top_p(logits, None if meta.no_top_k else meta.top_k, meta.top_p)
        elif not meta.no_top_k:
            assert meta.top_k is not None
            logits = apply_top_k_only(logits, meta.top_k, meta.max_top_k)

        probs = torch.softmax(logits, dim=-1)
        sampled = random_sample(probs, meta.generators)
        if greedy is not None:
            assert meta.is_greedy is not None
            sampled = torch.where(meta.is_greedy, greedy, sampled)
        return sampled


def apply_min_p(logits: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """Drop tokens whose probability is below min_p * (the row's top probability). In place.

    logits: [N, V] float32 (temperature applied); min_p: [N], 0 on rows without min-p.
    """
    probs = torch.softmax(logits, dim=-1)  # [N, V]
    threshold = min_p.unsqueeze(1) * probs.amax(dim=-1, keepdim=True)  # [N, 1]
    return logits.masked_fill_(probs < threshold, _NEG_INF)


def apply_top_k_only(logits: torch.Tensor, top_k: torch.Tensor, max_top_k: int) -> torch.Tensor:
    """Keep each row's top_k largest logits (ties at the k-th value are kept). In place.

    logits: [N, V]; top_k: [N] long, V on rows without top-k; max_top_k: max over rows using it.
    Uses topk(max_top_k) instead of a full sort.
    """
    vocab = logits.shape[1]
    no_top_k = top_k >= vocab  # [N]
    k_index = top_k.clamp(min=1, max=max_top_k).sub(1).unsqueeze(1)  # [N, 1], 0-based
    threshold = logits.topk(max_top_k, dim=1).values.gather(1, k_index)  # [N, 1]
    threshold.masked_fill_(no_top_k.unsqueeze(1), _NEG_INF)
    return logits.masked_fill_(logits < threshold, _NEG_INF)


def apply_top_k_top_p(
    logits: torch.Tensor, top_k: torch.Tensor | None, top_p: torch.Tensor | None
) -> torch.Tensor:
    """Top-k then top-p (on the top-k-renormalized distribution) with a single sort.

    logits: [N, V]; top_k: [N] long (V = off) or None; top_p: [N] float32 (1.0 = off) or None.
    Top-p keeps the smallest set of most likely tokens whose mass reaches p (always >= 1 token).
    """
    if top_k is None and top_p is None:
        return logits
    sorted_logits, order = logits.sort(dim=-1, descending=False)  # [N, V] ascending
    vocab = logits.shape[1]
    if top_k is not None:
        # The k-th largest sits at ascending index V - k; everything strictly below it goes.
        kth = sorted_logits.gather(1, (vocab - top_k).clamp(0, vocab - 1).unsqueeze(1))  # [N, 1]
        sorted_logits.masked_fill_(sorted_logits < kth, _NEG_INF)
    if top_p is not None:
        probs = sorted_logits.softmax(dim=-1)
        cum = torch.cumsum(probs, dim=-1)  # ascending: mass of this token and all less likely
        # Drop a token when the tokens strictly more likely than it already hold >= p.
        drop = cum <= (1.0 - top_p).unsqueeze(1)
        drop[:, -1] = False  # the most likely token always stays
        sorted_logits.masked_fill_(drop, _NEG_INF)
    return sorted_logits.scatter(1, order, sorted_logits)


def apply_top_p_within_top_k(
    logits: torch.Tensor, top_k: torch.Tensor, max_top_k: int, top_p: torch.Tensor
) -> torch.Tensor:
    """Top-k then top-p, for batches where every row with top-p < 1 also has top-k. In place.

    Same result as `apply_top_k_top_p`, but only the top `max_top_k` logits per row are sorted
    (by topk): the top-p cut always falls inside the row's top k.
    logits: [N, V]; top_k: [N] long (V = off, only on rows with top_p == 1); top_p: [N] float32.
    """
    vocab = logits.shape[1]
    values = logits.topk(max_top_k, dim=1).values  # [N, K] descending
    position = torch.arange(max_top_k, device=logits.device)  # [K]
    in_top_k = position < top_k.unsqueeze(1)  # [N, K]
    values = values.masked_fill(~in_top_k, _NEG_INF)
    probs = values.softmax(dim=-1)  # the top-k-renormalized distribution
    mass_before = probs.cumsum(dim=-1) - probs  # mass of the strictly more likely tokens
    # A prefix of each row survives; its length is >= 1 because mass_before[:, 0] == 0.
    keep = in_top_k & ((mass_before < top_p.unsqueeze(1)) | (top_p >= 1.0).unsqueeze(1))
    threshold = values.gather(1, keep.sum(dim=-1, keepdim=True) - 1)  # [N, 1] smallest kept logit
    threshold.masked_fill_((top_k >= vocab).unsqueeze(1), _NEG_INF)
    return logits.masked_fill_(logits < threshold, _NEG_INF)


def random_sample(probs: torch.Tensor, generators: dict[int, torch.Generator]) -> torch.Tensor:
    """One exact sample per row of probs [N, V] (rows may be unnormalized) -> [N] long.

    Unseeded rows share one draw from the device's default generator; each seeded row makes its
    own draw (`seeded_row_draw`, a loop over seeded rows only), so its tokens are independent of
    batch composition and position.
    """
    if draws_inverse_cdf(probs.device):
        return _inverse_cdf_sample(probs, generators)
    return _exponential_race(probs, generators)


def _seeded_rows(
    out: torch.Tensor, generators: dict[int, torch.Generator], vocab: int, inverse_cdf: bool
) -> None:
    """Each seeded row of `out` from its own generator (one launch a row on its device)."""
    for row, gen in generators.items():
        if _same_device(gen.device, out.device):
            seeded_row_draw(gen, vocab, inverse_cdf, out=out[row])
        else:  # a device without its own generators: drawn on the generator's device
            out[row].copy_(seeded_row_draw(gen, vocab, inverse_cdf))


def _inverse_cdf_sample(probs: torch.Tensor, generators: dict[int, torch.Generator]) -> torch.Tensor:
    """The first token whose cumulative mass exceeds U * (row mass), U ~ U[0, 1), found in two
    levels: the chunk of `_CDF_CHUNK` tokens holding the target, from a float64 cumsum of the
    chunks' float32 sums (a vectorized pass over [N, V]), then the token within that chunk, from
    a float64 cumsum of its [N, C] slice. A float64 cumsum over all of [N, V] runs on one thread,
    a few ns a token: tens of ms for a batch of 32 over a 150k vocabulary, where this takes about
    one (benchmarks/results/cpu.md).

    Each target is kept strictly below the mass it searches, and a token of zero mass leaves a
    cumsum unchanged, so neither a past-the-end index nor a masked token can come out (a chunk
    whose float32 sum is positive holds a positive token). The chunk sums round like the float32
    probabilities themselves (relative 1e-7).
    """
    n, vocab = probs.shape
    probs = probs.contiguous()
    u = torch.empty((n, 1), dtype=torch.float64, device=probs.device)  # [N, 1]
    if len(generators) < n:
        u.uniform_()
    _seeded_rows(u, generators, vocab, inverse_cdf=True)
    chunk_cdf = _chunk_sums(probs).cumsum(dim=-1)  # [N, B] float64
    chunk, residual = _search(chunk_cdf, u.mul_(chunk_cdf[:, -1:]))  # [N, 1] each
    cols = chunk * _CDF_CHUNK + torch.arange(_CDF_CHUNK, device=probs.device)  # [N, C]
    inside = cols < vocab  # the last chunk may be short
    local = probs.gather(1, cols.clamp(max=vocab - 1)).masked_fill_(~inside, 0.0)  # [N, C]
    token, _ = _search(local.cumsum(dim=-1, dtype=torch.float64), residual)
    return cols.gather(1, token).squeeze_(1)


def _chunk_sums(probs: torch.Tensor) -> torch.Tensor:
    """[N, V] -> [N, ceil(V / C)] float64: the mass of each chunk of `_CDF_CHUNK` tokens."""
    n, vocab = probs.shape
    full = vocab // _CDF_CHUNK * _CDF_CHUNK
    parts = []
    if full:
        parts.append(probs[:, :full].view(n, -1, _CDF_CHUNK).sum(dim=-1))
    if full < vocab:
        parts.append(probs[:, full:].sum(dim=-1, keepdim=True))
    return torch.cat(parts, dim=1).double()


def _search(cdf: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For cdf [N, B] (nondecreasing, last column > 0) and target [N, 1] >= 0: the first column
    whose cdf exceeds the target, held below the total, and the target's excess over the
    columns before it (>= 0, and below that column's mass)."""
    total = cdf[:, -1:]  # [N, 1]
    target = torch.minimum(target, torch.nextafter(total, torch.zeros_like(total)))
    col = torch.searchsorted(cdf, target, right=True)  # [N, 1], < B
    before = cdf.gather(1, (col - 1).clamp_(min=0)).masked_fill_(col == 0, 0.0)
    return col, target - before


def _exponential_race(probs: torch.Tensor, generators: dict[int, torch.Generator]) -> torch.Tensor:
    """argmax(probs / E), E ~ Exp(1) i.i.d. from `exponential_`: one pass over [N, V] for the
    unseeded rows (the device's default generator), one launch per seeded row (its own)."""
    n, vocab = probs.shape
    noise = torch.empty_like(probs)  # [N, V]
    if len(generators) < n:
        noise.exponential_()
    _seeded_rows(noise, generators, vocab, inverse_cdf=False)
    # An exact 0 draw would turn a masked token (p=0) into 0/0 = NaN, which argmax would pick.
    noise.clamp_(min=torch.finfo(noise.dtype).tiny)
    return probs.div_(noise).argmax(dim=-1)


def _same_device(a: torch.device, b: torch.device) -> bool:
    # "cuda" and "cuda:0" name the same device when one side leaves the index implicit.
    return a.type == b.type and (a.index is None or b.index is None or a.index == b.index)
