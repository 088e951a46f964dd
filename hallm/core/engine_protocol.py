"""Messages between the API process and the engine process (msgspec over ZMQ).

Every message is a tagged `msgspec.Struct` encoded as MessagePack and decoded against the union
of the types its direction allows, so a malformed or unexpected message is a decode error, never
code execution (no pickle). The engine process never sees text: requests carry token ids and
`SamplingParams` (with `detokenize=False` and no stop strings), outputs carry the new token ids
(and logprobs) of each request per step; the API process detokenizes and applies stop strings.
"""

from __future__ import annotations

from typing import Union

import msgspec

from hallm.core.sampling_params import SamplingParams

# ---- API process -> engine process ----------------------------------------------------------


class AddRequest(msgspec.Struct, tag=True, array_like=True):
    """Queue one sequence (n=1): prompt token ids and the engine-side sampling parameters;
    `client` is the index of the API server that sends it (its outputs go back there)."""

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    client: int = 0


class AbortRequests(msgspec.Struct, tag=True, array_like=True):
    """Abort requests (unknown or already finished ids are ignored) and free their blocks."""

    request_ids: list[str]


class Shutdown(msgspec.Struct, tag=True, array_like=True):
    """Abort whatever is left, shut the executor down and exit."""


EngineRequest = Union[AddRequest, AbortRequests, Shutdown]  # noqa: UP007 (msgspec needs a runtime union)

# ---- engine process -> API process ----------------------------------------------------------


class EngineStats(msgspec.Struct, array_like=True):
    """A snapshot of the scheduler and the KV-cache pool (see `LLMEngine.get_stats`)."""

    num_running: int
    num_waiting: int
    kv_cache_usage: float
    num_free_blocks: int
    num_blocks: int
    num_preemptions: int
    prefix_cache_queries: int
    prefix_cache_hits: int
    num_aborted: int = 0  # sequences aborted while waiting or running, in total
    #: The KV connector's name ("" without one) and its counters in total, by name without the
    #: "kv_connector_" prefix of `get_stats` (tokens_loaded, tokens_saved, load_failures, ...).
    kv_connector: str = ""
    kv_connector_counters: dict[str, int] = msgspec.field(default_factory=dict)


class TokenLogprobs(msgspec.Struct, array_like=True):
    """One output position: the sampled token first, then the top-k candidates (deduplicated);
    `ranks` are 1-based ranks in the model's distribution."""

    token_ids: list[int]
    logprobs: list[float]
    ranks: list[int]


class RequestDelta(msgspec.Struct, array_like=True):
    """What one step added to one request.

    token_ids: the tokens sampled since the previous delta. finish_reason: "stop" (EOS or a stop
    token id), "length" or "abort" once finished. error: the engine refused the request (it is
    then finished, with no tokens).
    """

    request_id: str
    token_ids: list[int]
    logprobs: list[TokenLogprobs] | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    num_cached_tokens: int = 0
    error: str | None = None
    #: With `prompt_logprobs`: one entry per prompt position (None for the first), sent once,
    #: with the first delta after the whole prompt was scored.
    prompt_logprobs: list[TokenLogprobs | None] | None = None


class Ready(msgspec.Struct, tag=True, array_like=True):
    """The engine is up: the KV pool's shape, for admission checks in the API process."""

    pid: int
    num_blocks: int
    num_usable_blocks: int
    block_size: int
    max_model_len: int
    stats: EngineStats


class StartupFailed(msgspec.Struct, tag=True, array_like=True):
    """Building the engine failed; `message` says why (the process then exits)."""

    message: str


class StepOutputs(msgspec.Struct, tag=True, array_like=True):
    """The requests one step changed, and the engine's stats after it."""

    outputs: list[RequestDelta]
    stats: EngineStats


class EngineFailed(msgspec.Struct, tag=True, array_like=True):
    """The engine loop hit an unrecoverable error; the process exits after sending this."""

    message: str


EngineOutput = Union[Ready, StartupFailed, StepOutputs, EngineFailed]  # noqa: UP007


def make_encoder() -> msgspec.msgpack.Encoder:
    """The encoder for both directions."""
    return msgspec.msgpack.Encoder()


def request_decoder() -> msgspec.msgpack.Decoder[EngineRequest]:
    """Decodes what the engine process receives."""
    return msgspec.msgpack.Decoder(EngineRequest)  # type: ignore[arg-type]


def output_decoder() -> msgspec.msgpack.Decoder[EngineOutput]:
    """Decodes what the API process receives."""
    return msgspec.msgpack.Decoder(EngineOutput)  # type: ignore[arg-type]
