"""Per-request sampling state (owned by the model runner) and the per-step SamplingMetadata.

`SamplingMetadata.build` turns the Python-side state of the N requests that sample this step
into a handful of device tensors, once per step, so that the Sampler itself is pure tensor code
with no Python loop over tokens. Flags computed here on the host (all_greedy, no_top_k, ...) let
the sampler skip whole stages without reading anything back from the device.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
from collections.abc import Sequence

import numpy as np
import torch

from hallm.core.sampling_params import SamplingParams
from hallm.core.structured_output import BitmaskStaging, GrammarMatcher, grammar_bitmask

logger = logging.getLogger(__name__)


def draws_inverse_cdf(device: torch.device | str) -> bool:
    """Whether random rows on `device` sample by inverse CDF (one uniform per row) rather than by
    the exponential race (one uniform per vocabulary entry); see `sampler.random_sample`."""
    return torch.device(device).type == "cpu"


def seeded_row_draw(
    generator: torch.Generator, vocab_size: int, inverse_cdf: bool, out: torch.Tensor | None = None
) -> torch.Tensor:
    """What a seeded row draws from its generator for one token, on the generator's device: one
    float64 uniform for the inverse CDF, [vocab_size] float32 Exp(1) noise for the exponential
    race; into `out` (a tensor of that shape and dtype on the generator's device) when given."""
    if out is None:
        dtype = torch.float64 if inverse_cdf else torch.float32
        out = torch.empty(1 if inverse_cdf else vocab_size, dtype=dtype, device=generator.device)
    if inverse_cdf:
        return out.uniform_(generator=generator)
    return out.exponential_(generator=generator)


def make_generator(seed: int, device: torch.device | str) -> torch.Generator:
    """A torch.Generator seeded with `seed` on `device`, or on the CPU where the device has none.

    The sampler draws a seeded row's noise on the generator's own device and copies it over, so a
    device type without `torch.Generator` support (some out-of-tree backends) still samples
    reproducibly, only slower.
    """
    device = torch.device(device)
    try:
        gen = torch.Generator(device=device)
    except (RuntimeError, TypeError) as e:
        logger.warning(
            "no torch.Generator on %s (%s); seeded requests draw their noise on the CPU", device, e
        )
        gen = torch.Generator(device="cpu")
    gen.manual_seed(seed)
    return gen


@dataclasses.dataclass(eq=False)
class RequestSamplingState:
    """One request's sampling state, kept by the model runner for the request's lifetime.

    The runner appends each sampled token to `output_token_ids` (the same list object).
    `generator` is created from `params.seed` when the request is seeded and none is given; for a
    request rebuilt with existing output tokens (after preemption) the generator is advanced past
    the draws those tokens consumed, so a seeded request's tokens do not depend on preemption.
    """

    params: SamplingParams
    prompt_token_ids: Sequence[int]
    output_token_ids: list[int] = dataclasses.field(default_factory=list)
    eos_token_ids: frozenset[int] = frozenset()
    device: torch.device | str = "cpu"
    generator: torch.Generator | None = None

    # Host-side caches, built lazily by SamplingMetadata.build (the vocab size is known there).
    _prompt_ids: torch.Tensor | None = dataclasses.field(default=None, repr=False)
    _prompt_ids_key: tuple[torch.device, int] | None = dataclasses.field(default=None, repr=False)
    _steps_to_skip: int = dataclasses.field(default=0, repr=False)
    _grammar: GrammarMatcher | None = dataclasses.field(default=None, repr=False)

    def __post_init__(self) -> None:
        self.eos_token_ids = frozenset(self.eos_token_ids)
        if self.generator is None and self.params.seed is not None and not self.params.is_greedy:
            seed = self.params.torch_seed
            assert seed is not None
            self.generator = make_generator(seed, self.device)
            self._steps_to_skip = len(self.output_token_ids)

    @property
    def stop_token_ids_for_min_tokens(self) -> list[int]:
        """Tokens masked while fewer than min_tokens are out: EOS (even with ignore_eos) and stop ids."""
        return sorted(self.eos_token_ids.union(self.params.stop_token_ids or ()))

    def prompt_ids_on(self, device: torch.device, vocab_size: int) -> torch.Tensor:
        """The prompt ids as a LongTensor on `device` (cached; ids outside the vocab dropped)."""
        # Keyed on the device as the runner names it: torch.device("cuda") != a tensor's "cuda:0".
        if self._prompt_ids is None or self._prompt_ids_key != (device, vocab_size):
            ids = np.asarray(self.prompt_token_ids, dtype=np.int64)  # a list or a numpy slice
            ids = np.ascontiguousarray(ids[(ids >= 0) & (ids < vocab_size)])
            self._prompt_ids = torch.from_numpy(ids).to(device, non_blocking=True)
            self._prompt_ids_key = (device, vocab_size)
        return self._prompt_ids

    @property
    def grammar(self) -> GrammarMatcher | None:
        """The request's grammar matcher (structured output), made on first use."""
        spec = self.params.structured_outputs
        if spec is not None and self._grammar is None:
            self._grammar = GrammarMatcher(spec)
        return self._grammar

    def advance_generator(self, vocab_size: int) -> None:
        """Replay the draws of already-sampled tokens (`seeded_row_draw` per token), once."""
        if self._steps_to_skip and self.generator is not None:
            for _ in range(self._steps_to_skip):
                seeded_row_draw(self.generator, vocab_size, draws_inverse_cdf(self.device))
        self._steps_to_skip = 0


@dataclasses.dataclass
class SamplingMetadata:
    """Everything the Sampler needs for one step of N rows, as device tensors plus host flags.

    A tensor is None when no row needs that stage (the matching flag is True).
    """

    num_reqs: int
    vocab_size: int

    all_greedy: bool
    all_random: bool
    no_penalties: bool
    no_top_k: bool
    no_top_p: bool
    no_min_p: bool

    temperature: torch.Tensor | None  # [N] float32; 1.0 on greedy rows; None when all_greedy
    is_greedy: torch.Tensor | None  # [N] bool; None when all rows agree (all_greedy or all_random)
    top_k: torch.Tensor | None  # [N] long; vocab_size on rows without top-k
    max_top_k: int  # max of top_k over rows that use it (host int: no device sync)
    top_p_within_top_k: bool  # every row with top-p also has top-k: no full-vocabulary sort needed
    top_p: torch.Tensor | None  # [N] float32; 1.0 on rows without top-p
    min_p: torch.Tensor | None  # [N] float32; 0.0 on rows without min-p

    presence_penalty: torch.Tensor | None  # [N] float32; None when no row uses it
    frequency_penalty: torch.Tensor | None  # [N] float32
    repetition_penalty: torch.Tensor | None  # [N] float32
    output_token_counts: torch.Tensor | None  # [N, V] float32, counts of each token in the output
    prompt_mask: torch.Tensor | None  # [N, V] bool, token occurs in the prompt (repetition penalty)

    # Sparse (row, token) entries, flattened over the batch.
    min_tokens_mask: tuple[torch.Tensor, torch.Tensor] | None  # rows [M], token ids [M] set to -inf
    logit_bias: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None  # rows [B], ids [B], bias [B]

    generators: dict[int, torch.Generator]  # row -> its own generator (seeded rows only)
    max_num_logprobs: int | None  # max `logprobs` over rows; None when no row asks for them

    # Structured output: the rows with a grammar and their states. Their token masks depend on
    # the tokens sampled so far, so they are computed when the sampler runs (`grammar_mask`),
    # which keeps metadata reused across steps correct.
    grammar_rows: list[int] = dataclasses.field(default_factory=list)
    grammar_states: list[RequestSamplingState] = dataclasses.field(default_factory=list)
    _grammar_row_index: torch.Tensor | None = dataclasses.field(default=None, repr=False)

    def grammar_mask(
        self, device: torch.device, staging: BitmaskStaging | None = None
    ) -> tuple[torch.Tensor | None, torch.Tensor]:
        """(rows [M] long, or None when every row has a grammar; bitmask [M, W] int32), on `device`;
        the host side written into `staging` when given."""
        matchers = [s.grammar for s in self.grammar_states]
        mask = grammar_bitmask(
            [m for m in matchers if m is not None],
            [s.output_token_ids for s in self.grammar_states],
            [s.eos_token_ids for s in self.grammar_states],
            staging,
        )
        rows = None
        if len(self.grammar_rows) != self.num_reqs:
            if self._grammar_row_index is None:
                self._grammar_row_index = torch.tensor(self.grammar_rows, dtype=torch.long).to(device)
            rows = self._grammar_row_index
        return rows, mask.to(device, non_blocking=True)

    @classmethod
    def build(
        cls, states: Sequence[RequestSamplingState], vocab_size: int, device: torch.device | str
    ) -> SamplingMetadata:
        """Build the metadata for `states`, one per row of this step's logits, in row order.

        Only requests that sample a token this step belong in `states` (a partial prefill chunk
        samples nothing). Costs a loop over requests on the host and a few host-to-device copies;
        the output-token counts cost one scatter over all output tokens of penalized rows.
        """
        device = torch.device(device)
        n = len(states)
        params = [s.params for s in states]
        greedy = [p.is_greedy for p in params]
        all_greedy = all(greedy)
        all_random = not any(greedy)

        # Truncation knobs only matter on random rows (SamplingParams neutralizes them on greedy).
        top_ks = [p.top_k if 0 < p.top_k < vocab_size else vocab_size for p in params]
        use_top_k = [k < vocab_size for k in top_ks]
        no_top_k = all_greedy or not any(use_top_k)
        no_top_p = all_greedy or all(p.top_p >= 1.0 for p in params)
        no_min_p = all_greedy or all(p.min_p <= 0.0 for p in params)
        max_top_k = max((k for k, used in zip(top_ks, use_top_k, strict=True) if used), default=0)
        top_p_within_top_k = all(used for p, used in zip(params, use_top_k, strict=True) if p.top_p < 1.0)

        use_presence = any(p.presence_penalty != 0.0 for p in params)
        use_frequency = any(p.frequency_penalty != 0.0 for p in params)
        use_repetition = any(p.repetition_penalty != 1.0 for p in params)
        no_penalties = not (use_presence or use_frequency or use_repetition)

        # All per-row floats travel in one host-to-device copy: [6, N].
        floats = torch.from_numpy(
            np.array(
                [
                    [1.0 if g else p.temperature for p, g in zip(params, greedy, strict=True)],
                    [p.top_p for p in params],
                    [p.min_p for p in params],
                    [p.presence_penalty for p in params],
                    [p.frequency_penalty for p in params],
                    [p.repetition_penalty for p in params],
                ],
                dtype=np.float32,
            )
        ).to(device, non_blocking=True)

        is_greedy = None
        if not all_greedy and not all_random:
            is_greedy = torch.tensor(greedy, dtype=torch.bool).to(device, non_blocking=True)
        top_k = None if no_top_k else torch.tensor(top_ks, dtype=torch.long).to(device, non_blocking=True)

        counts = prompt_mask = None
        if not no_penalties:
            penalized = [i for i, p in enumerate(params) if p.has_penalties]
            counts = _output_token_counts(states, penalized, n, vocab_size, device)
            if use_repetition:
                rep_rows = [i for i in penalized if params[i].repetition_penalty != 1.0]
                prompt_mask = _prompt_mask(states, rep_rows, n, vocab_size, device)

        generators: dict[int, torch.Generator] = {}
        for i, state in enumerate(states):
            if state.generator is not None and not greedy[i]:
                state.advance_generator(vocab_size)
                generators[i] = state.generator

        logprob_ks = [p.logprobs for p in params if p.logprobs is not None]
        return cls(
            num_reqs=n,
            vocab_size=vocab_size,
            all_greedy=all_greedy,
            all_random=all_random,
            no_penalties=no_penalties,
            no_top_k=no_top_k,
            no_top_p=no_top_p,
            no_min_p=no_min_p,
            temperature=None if all_greedy else floats[0],
            is_greedy=is_greedy,
            top_k=top_k,
            max_top_k=max_top_k,
            top_p_within_top_k=top_p_within_top_k,
            top_p=None if no_top_p else floats[1],
            min_p=None if no_min_p else floats[2],
            presence_penalty=floats[3] if use_presence else None,
            frequency_penalty=floats[4] if use_frequency else None,
            repetition_penalty=floats[5] if use_repetition else None,
            output_token_counts=counts,
            prompt_mask=prompt_mask,
            min_tokens_mask=_min_tokens_mask(states, vocab_size, device),
            logit_bias=_logit_bias(params, vocab_size, device),
            generators=generators,
            max_num_logprobs=max(logprob_ks) if logprob_ks else None,
            grammar_rows=[i for i, p in enumerate(params) if p.structured_outputs is not None],
            grammar_states=[s for s in states if s.params.structured_outputs is not None],
        )


def _row_index(rows: list[int], lengths: list[int], device: torch.device) -> torch.Tensor:
    """[sum(lengths)] row ids: rows[j] repeated lengths[j] times (output_size avoids a device sync)."""
    total = sum(lengths)
    return torch.repeat_interleave(
        torch.tensor(rows, dtype=torch.long).to(device, non_blocking=True),
        torch.tensor(lengths, dtype=torch.long).to(device, non_blocking=True),
        output_size=total,
    )


def _output_token_counts(
    states: Sequence[RequestSamplingState], rows: list[int], n: int, vocab_size: int, device: torch.device
) -> torch.Tensor:
    """[N, V] float32 occurrence counts of each token in the output of the `rows` requests."""
    counts = torch.zeros(n, vocab_size, dtype=torch.float32, device=device)
    lengths = [len(states[i].output_token_ids) for i in rows]
    if sum(lengths) == 0:
        return counts
    total = sum(lengths)
    # numpy.fromiter is ~6x faster than torch.tensor(list) for the 100k+ ids of a large batch.
    flat = np.fromiter(
        itertools.chain.from_iterable(states[i].output_token_ids for i in rows), dtype=np.int64, count=total
    )
    tokens = torch.from_numpy(flat).to(device, non_blocking=True)
    ones = torch.ones(total, dtype=torch.float32, device=device)
    counts.index_put_((_row_index(rows, lengths, device), tokens), ones, accumulate=True)
    return counts


def _prompt_mask(
    states: Sequence[RequestSamplingState], rows: list[int], n: int, vocab_size: int, device: torch.device
) -> torch.Tensor:
    """[N, V] bool: the token occurs in the prompt of the `rows` requests (prompt ids cached per request)."""
    mask = torch.zeros(n, vocab_size, dtype=torch.bool, device=device)
    ids = [states[i].prompt_ids_on(device, vocab_size) for i in rows]
    lengths = [t.numel() for t in ids]
    if sum(lengths) == 0:
        return mask
    mask[_row_index(rows, lengths, device), torch.cat(ids)] = True
    return mask


def _min_tokens_mask(
    states: Sequence[RequestSamplingState], vocab_size: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(rows, token ids) to set to -inf: stop tokens of requests still short of min_tokens."""
    rows: list[int] = []
    tokens: list[int] = []
    for i, state in enumerate(states):
        if len(state.output_token_ids) < state.params.min_tokens:
            stop_ids = [t for t in state.stop_token_ids_for_min_tokens if 0 <= t < vocab_size]
            rows.extend([i] * len(stop_ids))
            tokens.extend(stop_ids)
    if not rows:
        return None
    return (
        torch.tensor(rows, dtype=torch.long).to(device, non_blocking=True),
        torch.tensor(tokens, dtype=torch.long).to(device, non_blocking=True),
    )


def _logit_bias(
    params: Sequence[SamplingParams], vocab_size: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """(rows, token ids, biases) for requests with a logit_bias."""
    rows: list[int] = []
    tokens: list[int] = []
    biases: list[float] = []
    for i, p in enumerate(params):
        if not p.logit_bias:
            continue
        # Out-of-vocab ids are rejected at admission (SamplingParams.verify_vocab); never fail a step.
        entries = [(t, b) for t, b in p.logit_bias.items() if t < vocab_size]
        rows.extend([i] * len(entries))
        tokens.extend(t for t, _ in entries)
        biases.extend(b for _, b in entries)
    if not rows:
        return None
    return (
        torch.tensor(rows, dtype=torch.long).to(device, non_blocking=True),
        torch.tensor(tokens, dtype=torch.long).to(device, non_blocking=True),
        torch.tensor(biases, dtype=torch.float32).to(device, non_blocking=True),
    )
