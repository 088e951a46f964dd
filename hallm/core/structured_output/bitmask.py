"""Token masks of grammar-constrained rows: computed on the host by llguidance (one bit per
token), copied to the device and applied to the logits as plain tensor work (any device).

A request's `GrammarMatcher` follows its output: before each mask it consumes the tokens sampled
since the previous one (the list the model runner appends to), so a request rebuilt after
preemption replays its output once and goes on where it was.
"""

from __future__ import annotations

import ctypes
import logging
from collections.abc import Sequence
from typing import Any

import torch

from hallm.core.structured_output.grammar import compile_grammar, vocabulary_size
from hallm.core.structured_output.params import StructuredOutputsParams

logger = logging.getLogger(__name__)

_NEG_INF = float("-inf")


class GrammarMatcher:
    """One request's position in its grammar."""

    def __init__(self, spec: StructuredOutputsParams) -> None:
        self.matcher: Any = compile_grammar(spec).deep_copy()
        assert spec.tokenizer is not None  # compile_grammar checked it
        self.num_words = (vocabulary_size(spec.tokenizer) + 31) // 32
        self.num_consumed = 0
        self._warned = False

    def catch_up(self, output_token_ids: Sequence[int]) -> None:
        """Consume the output tokens sampled since the last call."""
        if len(output_token_ids) > self.num_consumed:
            if not self.matcher.is_stopped():  # past the end (ignore_eos) there is nothing to follow
                self.matcher.consume_tokens(list(output_token_ids[self.num_consumed :]))
            self.num_consumed = len(output_token_ids)

    @property
    def done(self) -> bool:
        """Stopped or failed: only EOS may follow (`fill` writes that mask itself)."""
        return bool(self.matcher.is_stopped() or self.matcher.is_error())

    def fill_ptr(self, address: int, num_words: int, eos_token_ids: frozenset[int]) -> None:
        """Write the allowed tokens into the `num_words` int32 words (>= self.num_words) of host
        memory at `address`; words past this grammar's vocabulary are zeroed."""
        nbytes = num_words * 4
        if self.done:
            # Stopped: the grammar is complete, only EOS may follow. An error cannot happen with
            # masked sampling; if it does, end the request rather than emit junk.
            if self.matcher.is_error() and not self._warned:
                logger.warning("grammar matcher failed (%s); ending the request", self.matcher.get_error())
                self._warned = True
            row = (ctypes.c_uint8 * nbytes).from_address(address)
            ctypes.memset(address, 0, nbytes)
            for t in eos_token_ids:  # little-endian words: token t is bit t % 8 of byte t // 8
                if t < nbytes * 8:
                    row[t // 8] |= 1 << (t % 8)
            return
        own = self.num_words * 4
        self.matcher.unsafe_compute_mask_ptr(address, own)
        if nbytes > own:
            ctypes.memset(address + own, 0, nbytes - own)

    def fill(self, row: torch.Tensor, eos_token_ids: frozenset[int]) -> None:
        """Write the allowed tokens into `row` (a contiguous int32 CPU tensor of words)."""
        self.fill_ptr(row.data_ptr(), row.numel(), eos_token_ids)


class BitmaskStaging:
    """Host buffers the step's masks are written into: two of them, used in turn, so that a
    buffer is rewritten only after the device copy of the step before the previous one, which
    the sampler's wait for the previous step's results has seen complete. Pinned where the
    device copies from pinned memory asynchronously; they grow and are then kept."""

    def __init__(self, pin_memory: bool = False) -> None:
        self.pin_memory = pin_memory
        self._buffers: list[torch.Tensor] = []
        self._next = 0

    def take(self, rows: int, words: int) -> torch.Tensor:
        """A [rows, words] int32 CPU tensor (contents undefined)."""
        if not self._buffers or self._buffers[0].numel() < rows * words:
            size = max(rows * words, 2 * self._buffers[0].numel() if self._buffers else 0)
            self._buffers = [
                torch.empty(size, dtype=torch.int32, pin_memory=self.pin_memory) for _ in range(2)
            ]
        buf = self._buffers[self._next]
        self._next ^= 1
        return buf[: rows * words].view(rows, words)


def grammar_bitmask(
    matchers: Sequence[GrammarMatcher],
    outputs: Sequence[Sequence[int]],
    eos_token_ids: Sequence[frozenset[int]],
    staging: BitmaskStaging | None = None,
) -> torch.Tensor:
    """[M, W] int32 (CPU) allowed-token bits of M constrained rows, after catching up each matcher;
    written into `staging`'s next buffer when given.

    Row by row on the calling thread, each row written by address (~2 us of Python a row around
    llguidance's own work). llguidance's thread pool computes a batch's rows faster in isolation,
    but inside the engine its threads compete with the step's own host work and the whole step
    gets slower (benchmarks/structured_output.py; numbers in benchmarks/results/gpu.md)."""
    words = max(m.num_words for m in matchers)
    if staging is None:
        mask = torch.empty((len(matchers), words), dtype=torch.int32)
    else:
        mask = staging.take(len(matchers), words)
    base, stride = mask.data_ptr(), words * 4
    for i, (matcher, output, eos) in enumerate(zip(matchers, outputs, eos_token_ids, strict=True)):
        matcher.catch_up(output)
        matcher.fill_ptr(base + i * stride, words, eos)
    return mask


_SHIFTS: dict[torch.device, torch.Tensor] = {}


def apply_token_bitmask(
    logits: torch.Tensor, rows: torch.Tensor | None, bitmask: torch.Tensor
) -> torch.Tensor:
    """Set disallowed tokens to -inf, in place. logits: [N, V] float; rows: [M] long (None: all N
    rows, in order); bitmask: [M, W] int32 on logits' device, bit t%32 of word t//32 = token t.
    Tokens beyond 32*W are disallowed."""
    m, words = bitmask.shape
    vocab = logits.shape[1]
    shifts = _SHIFTS.get(logits.device)
    if shifts is None:
        shifts = _SHIFTS[logits.device] = torch.arange(32, dtype=torch.int32, device=logits.device)
    banned = ((bitmask.unsqueeze(-1) >> shifts) & 1).view(m, words * 32) == 0  # [M, 32W]
    if words * 32 >= vocab:
        banned = banned[:, :vocab]
    else:
        banned = torch.nn.functional.pad(banned, (0, vocab - words * 32), value=True)
    if rows is None:
        return logits.masked_fill_(banned, _NEG_INF)
    sub = logits.index_select(0, rows).masked_fill_(banned, _NEG_INF)
    return logits.index_copy_(0, rows, sub)
