"""Token deltas from the engine process -> text deltas, in the API process.

One `SequenceText` per generated sequence runs the incremental detokenizer and the stop strings
(the engine process sees neither), decodes logprob candidates, and counts tokens exactly: a
sequence stopped by a stop string ends at the token that completed it, even if the engine
produced more before the abort reached it. `stream_sequence` ties that to the engine client and
the server metrics.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import AsyncIterator
from typing import Any

from hallm.core.detokenizer import IncrementalDetokenizer, decode_logprob_token
from hallm.core.engine_protocol import RequestDelta, TokenLogprobs
from hallm.core.sampling_params import SamplingParams


@dataclasses.dataclass
class TokenLogprob:
    """One output position: the sampled token, its logprob and the top-k candidates (ranked)."""

    token_id: int
    token: str
    logprob: float
    top: list[tuple[int, str, float]]  # (token id, text, logprob), most likely first
    rank: int = 1  # the token's 1-based rank in the model's distribution


@dataclasses.dataclass
class SequenceUpdate:
    """What a sequence gained since its previous update."""

    text: str
    token_ids: list[int]
    logprobs: list[TokenLogprob] | None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    num_cached_tokens: int = 0
    #: Once, with the first update after the prompt was scored (prompt_logprobs): one entry per
    #: prompt token, None for the first.
    prompt_logprobs: list[TokenLogprob | None] | None = None


def engine_params(params: SamplingParams) -> SamplingParams:
    """The engine process's copy of `params`: token-level only (no text, no stop strings)."""
    return dataclasses.replace(params, stop=None, include_stop_str_in_output=False, detokenize=False)


class SequenceText:
    """Detokenization, stop strings and logprob text of one sequence (n=1)."""

    def __init__(self, tokenizer: Any, prompt_token_ids: list[int], params: SamplingParams) -> None:
        self.tokenizer = tokenizer
        self.params = params
        self.detokenizer = IncrementalDetokenizer(tokenizer, prompt_token_ids, params)
        self.num_tokens = 0
        self.finish_reason: str | None = None

    def update(self, deltas: list[RequestDelta]) -> SequenceUpdate:
        """Apply the engine's deltas (in order); tokens past a stop-string match are dropped."""
        text: list[str] = []
        token_ids: list[int] = []
        logprobs: list[TokenLogprob] | None = [] if self.params.logprobs is not None else None
        out = SequenceUpdate("", token_ids, logprobs)
        detok = self.detokenizer
        for delta in deltas:
            out.num_cached_tokens = delta.num_cached_tokens
            if delta.prompt_logprobs is not None:
                k = self.params.prompt_logprobs or 0
                out.prompt_logprobs = [
                    None if e is None else self._logprob(e.token_ids[0], e, k) for e in delta.prompt_logprobs
                ]
            n = len(delta.token_ids)
            for i, token in enumerate(delta.token_ids):
                if self.finish_reason is not None:
                    break
                last = i == n - 1
                engine_stop = last and delta.finish_reason == "stop"
                text.append(detok.update([token], stop_terminated=engine_stop))
                token_ids.append(token)
                self.num_tokens += 1
                if logprobs is not None and delta.logprobs is not None and i < len(delta.logprobs):
                    logprobs.append(self._logprob(token, delta.logprobs[i], self.params.logprobs or 0))
                if detok.stop_string is not None:
                    self.finish_reason, out.stop_reason = "stop", detok.stop_string
                elif last and delta.finish_reason is not None:
                    self.finish_reason, out.stop_reason = delta.finish_reason, delta.stop_reason
            if self.finish_reason is None and delta.finish_reason is not None:  # e.g. abort, no tokens
                self.finish_reason, out.stop_reason = delta.finish_reason, delta.stop_reason
            if self.finish_reason is not None:
                break
        if self.finish_reason is not None:
            text.append(detok.flush())
        out.text = "".join(text)
        out.finish_reason = self.finish_reason
        return out

    @property
    def text(self) -> str:
        """The full output text so far (including characters held back from streaming)."""
        return self.detokenizer.output_text

    def _logprob(self, token: int, entry: TokenLogprobs, k: int) -> TokenLogprob:
        decode = self.tokenizer
        ranked = sorted(
            (rank, tid, lp)
            for tid, lp, rank in zip(entry.token_ids, entry.logprobs, entry.ranks, strict=True)
            if rank <= k
        )
        top = [(tid, decode_logprob_token(decode, tid), lp) for _, tid, lp in ranked]
        return TokenLogprob(
            token, decode_logprob_token(decode, token), entry.logprobs[0], top, entry.ranks[0]
        )


async def stream_sequence(
    client: Any,
    tokenizer: Any,
    request_id: str,
    prompt_token_ids: list[int],
    params: SamplingParams,
    metrics: Any = None,
) -> AsyncIterator[SequenceUpdate]:
    """Run one sequence on the engine and yield its updates until it finishes.

    Leaving early (or a stop string) aborts it in the engine. `metrics` (a `ServerMetrics`)
    records TTFT, inter-token latency, end-to-end latency and token counts; a sequence left
    before it finished counts as finished_reason="abort".
    """
    arrival = time.monotonic()
    state = SequenceText(tokenizer, prompt_token_ids, params)
    stream = client.generate(request_id, prompt_token_ids, engine_params(params))
    last = arrival
    first = True
    finished = False
    try:
        async for deltas in stream:
            update = state.update(deltas)
            now = time.monotonic()
            n = len(update.token_ids)
            if metrics is not None and n:
                if first:
                    metrics.first_token(now - arrival, len(prompt_token_ids))
                    if n > 1:
                        metrics.tokens(n - 1, now - last)
                else:
                    metrics.tokens(n, now - last)
                first = False
            last = now
            if update.finish_reason is not None:
                finished = True
                if metrics is not None:
                    metrics.finished(update.finish_reason, now - arrival)
            yield update
            if finished:
                return
    finally:
        await stream.aclose()
        if not finished and metrics is not None:  # abandoned (client gone, error): aborted
            metrics.finished("abort", time.monotonic() - arrival)
