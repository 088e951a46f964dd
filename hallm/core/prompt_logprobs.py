"""A step's prompt logprobs (`SamplingParams.prompt_logprobs`): the logprobs of the prompt tokens
this step computes, from the hidden states of the positions before them, added to the step's
handle for the host copy. A prompt split over chunked-prefill steps is scored chunk by chunk."""

from __future__ import annotations

from typing import Any

import torch

from hallm.core.input_batch import CachedRequestState
from hallm.core.logprobs import compute_prompt_logprobs
from hallm.core.scheduler_output import SchedulerOutput
from hallm.core.step_handle import StepHandle


def add_prompt_logprobs(
    model: Any,
    states: list[CachedRequestState],
    step: SchedulerOutput,
    layout: Any,
    hidden: torch.Tensor,
    handle: StepHandle,
) -> None:
    """For each request in `states` (the step's rows, in order) that asks for prompt logprobs and
    whose prompt this step reaches: its chunk's logprobs in `handle.prompt_slots` (an empty
    result when the chunk holds only the prompt's last token, which predicts no prompt token)."""
    for i, st in enumerate(states):
        k = st.params.prompt_logprobs
        c = st.num_computed_tokens
        if k is None or c >= st.num_prompt_tokens:
            continue
        n = step.num_scheduled_tokens[st.req_id]
        # Position p's logits predict token p+1; the prompt's first token has no logprob.
        end = min(c + n, st.num_prompt_tokens - 1)
        start = int(layout.query_start_loc[i])
        if end <= c:
            handle.output.prompt_logprobs[st.req_id] = ([], [], [])
            continue
        logits = model.compute_logits(hidden[start : start + (end - c)])
        targets = torch.from_numpy(st.token_ids[c + 1 : end + 1]).to(hidden.device, non_blocking=True)
        lp = compute_prompt_logprobs(logits, targets, k)
        handle.prompt_slots.append((st.req_id, handle.add_host(lp.token_ids, lp.logprobs, lp.sampled_rank)))
