"""Logit adjustments that depend on a request's history: logit_bias, min_tokens, penalties.

They run before greedy/random sampling (so greedy requests see them too), in vLLM's order:
logit_bias, min_tokens, then repetition/frequency/presence penalties. Each function returns the
adjusted [N, V] float32 logits; `owned` says whether the input may be modified in place (the
sampler never modifies the caller's logits).
"""

from __future__ import annotations

import torch

from hallm.core.sampling_metadata import SamplingMetadata


def apply_logit_bias(logits: torch.Tensor, meta: SamplingMetadata, owned: bool) -> tuple[torch.Tensor, bool]:
    """Add each request's logit_bias entries. Returns (logits, owned)."""
    if meta.logit_bias is None:
        return logits, owned
    if not owned:
        logits, owned = logits.clone(), True
    rows, tokens, bias = meta.logit_bias  # [B] each
    logits.index_put_((rows, tokens), bias, accumulate=True)
    return logits, owned


def apply_min_tokens(logits: torch.Tensor, meta: SamplingMetadata, owned: bool) -> tuple[torch.Tensor, bool]:
    """Forbid EOS and stop_token_ids on rows that have not yet produced min_tokens tokens."""
    if meta.min_tokens_mask is None:
        return logits, owned
    if not owned:
        logits, owned = logits.clone(), True
    rows, tokens = meta.min_tokens_mask  # [M] each
    logits[rows, tokens] = float("-inf")
    return logits, owned


def apply_penalties(logits: torch.Tensor, meta: SamplingMetadata) -> torch.Tensor:
    """Repetition, frequency and presence penalties, with vLLM's (and OpenAI's) definitions.

    repetition: for tokens seen in the prompt or the output, positive logits are divided by the
                penalty and negative ones multiplied by it.
    frequency:  logit -= penalty * (count of the token in the output)
    presence:   logit -= penalty * (1 if the token occurs in the output)
    Returns a new tensor (never in place) when any penalty applies.
    """
    if meta.no_penalties:
        return logits
    counts = meta.output_token_counts  # [N, V] float32
    assert counts is not None
    if meta.repetition_penalty is not None:
        assert meta.prompt_mask is not None
        seen = meta.prompt_mask | (counts > 0)  # [N, V]
        penalty = torch.where(seen, meta.repetition_penalty.unsqueeze(1), 1.0)  # [N, V]
        logits = torch.where(logits > 0, logits / penalty, logits * penalty)
    if meta.frequency_penalty is not None:
        logits = logits - meta.frequency_penalty.unsqueeze(1) * counts
    if meta.presence_penalty is not None:
        logits = logits - meta.presence_penalty.unsqueeze(1) * (counts > 0).to(logits.dtype)
    return logits
