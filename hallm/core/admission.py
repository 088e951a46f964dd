"""Admission: the checks a request passes before the engine accepts it (prompt ids within the
vocabulary, prompt and output within the context and the KV pool, logit_bias and stop ids the
model can produce, a grammar that compiles), shared by the engine and the API server, and the
error that refuses one."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from hallm.core.sampling_params import SamplingParams
from hallm.platforms import HallmError


class InvalidRequestError(HallmError, ValueError):
    """A request the engine refuses; the message names the field and the limit.

    `param` is the request field at fault and `code` a machine-readable reason (as the OpenAI
    API reports them), when known.
    """

    def __init__(self, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.param = param
        self.code = code


@dataclasses.dataclass(frozen=True)
class AdmissionLimits:
    """What a request is checked against before it is accepted: the model's and the KV pool's limits."""

    max_model_len: int
    vocab_size: int
    block_size: int | None = None  # None: the KV pool is not known (its checks are skipped)
    num_usable_blocks: int | None = None
    #: The model's tokenizer source; None skips the structured-output check (the caller makes it).
    tokenizer: str | None = None


def check_admission(
    token_ids: Sequence[int],
    params: SamplingParams,
    limits: AdmissionLimits,
    what: str = "prompt",
    max_tokens_within_context: bool = False,
) -> None:
    """Refuse a request that can never run: empty prompt, ids outside the vocabulary, a prompt
    (or a prompt plus its longest output) past the context limit or the whole KV pool, logit_bias
    ids the model cannot produce. The one admission check: the engine calls it on every request,
    the API server calls it before sending one to the engine process.

    `what` names the prompt in messages ("prompt", "messages"); `max_tokens_within_context`
    refuses a max_tokens that runs past the context limit (the OpenAI API's rule) instead of
    letting it end there.
    """
    n = len(token_ids)
    max_len = limits.max_model_len
    if n == 0:
        raise InvalidRequestError(f"the {what} is empty; give at least one token", what)
    bad = None
    if min(token_ids) < 0 or max(token_ids) >= limits.vocab_size:  # C loops; the scan names one
        bad = next(t for t in token_ids if not 0 <= t < limits.vocab_size)
    if bad is not None:
        raise InvalidRequestError(
            f"the {what} has token id {bad}, outside the vocabulary [0, {limits.vocab_size})", what
        )
    if n >= max_len:
        raise InvalidRequestError(
            f"This model's maximum context length (max_model_len) is {max_len} tokens, but the {what} has "
            f"{n} tokens and at least one token must be generated. Shorten the {what}.",
            what,
            "context_length_exceeded",
        )
    if max_tokens_within_context and params.max_tokens is not None and n + params.max_tokens > max_len:
        raise InvalidRequestError(
            f"This model's maximum context length (max_model_len) is {max_len} tokens. However, you requested "
            f"{n + params.max_tokens} tokens ({n} in the {what}, {params.max_tokens} in the completion). "
            f"Shorten the {what} or lower max_tokens.",
            "max_tokens",
            "context_length_exceeded",
        )
    if limits.block_size is not None and limits.num_usable_blocks is not None:
        usable = limits.num_usable_blocks
        needed = -(-(n + 1) // limits.block_size)
        if needed > usable:
            raise InvalidRequestError(
                f"the {what} needs {needed} KV-cache blocks but the whole KV cache has {usable}; it can never "
                f"fit: shorten the {what}, or give the engine more KV-cache memory (--gpu-memory-utilization, "
                "--num-gpu-blocks-override)",
                what,
                "context_length_exceeded",
            )
        # At its longest a request holds the KV of its prompt and of every output token but the
        # last. One that could outgrow the whole pool would stall the engine when it got there.
        room = max_len - n
        max_new = room if params.max_tokens is None else min(params.max_tokens, room)
        needed = -(-(n + max_new - 1) // limits.block_size)
        if needed > usable:
            raise InvalidRequestError(
                f"the request can grow to {needed} KV-cache blocks ({n} {what} tokens + max_tokens={max_new}) "
                f"but the whole KV cache has {usable}; it can never fit: lower max_tokens, shorten the "
                f"{what}, or give the engine more KV-cache memory",
                "max_tokens",
                "context_length_exceeded",
            )
    try:
        params.verify_vocab(limits.vocab_size)
    except ValueError as e:
        raise InvalidRequestError(str(e), "logit_bias") from None
    bad_stop = sorted(t for t in params.stop_token_ids or () if not 0 <= t < limits.vocab_size)
    if bad_stop:
        raise InvalidRequestError(
            f"stop_token_ids must be token ids in [0, {limits.vocab_size}) (the model's vocabulary), got "
            f"{bad_stop}; the model can never produce them",
            "stop_token_ids",
        )
    if params.structured_outputs is not None and limits.tokenizer is not None:
        check_structured_output(params, limits.tokenizer)


def check_structured_output(params: SamplingParams, tokenizer_source: str) -> None:
    """Bind the request's grammar to the model's vocabulary and check that it compiles (the
    compiled grammar is cached for the sampler)."""
    from hallm.core.structured_output import StructuredOutputError, bind

    assert params.structured_outputs is not None
    try:
        bind(params.structured_outputs, tokenizer_source)
    except StructuredOutputError as e:
        raise InvalidRequestError(str(e), "structured_outputs") from None
