"""Outputs: what the workers return each step, and what the user receives."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass
class Logprob:
    """One candidate token's log probability, its 1-based rank, and its text."""

    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


#: Per position: token id -> Logprob (the sampled/prompt token plus the top-k).
PositionLogprobs = dict[int, Logprob]


@dataclasses.dataclass
class ModelRunnerOutput:
    """One step's results, per request that was scheduled.

    sampled_token_ids[req_id] is absent for a request whose prompt is only partly computed.
    logprobs[req_id]: (token ids [1+k], logprobs [1+k], sampled rank) for the sampled token.
    prompt_logprobs[req_id]: (token ids [n, 1+k], logprobs [n, 1+k], ranks [n]) for the prompt
    positions computed this step.
    """

    sampled_token_ids: dict[str, int]
    logprobs: dict[str, tuple[list[int], list[float], int]] = dataclasses.field(default_factory=dict)
    prompt_logprobs: dict[str, tuple[list[list[int]], list[list[float]], list[int]]] = dataclasses.field(
        default_factory=dict
    )
    # With a KV connector: the step's loads that completed (a load not named here failed and is
    # recomputed), the requests whose sends finished, and the worker side's counters.
    kv_loaded: set[str] = dataclasses.field(default_factory=set)
    kv_finished_sending: set[str] = dataclasses.field(default_factory=set)
    kv_connector_stats: dict[str, int] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None
    logprobs: list[PositionLogprobs] | None
    finish_reason: str | None = None
    stop_reason: int | str | None = None

    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclasses.dataclass
class RequestOutput:
    """A request's state as returned by `LLM.generate` and streamed by the engine (vLLM's shape)."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    prompt_logprobs: list[PositionLogprobs | None] | None
    outputs: list[CompletionOutput]
    finished: bool
    num_cached_tokens: int = 0
