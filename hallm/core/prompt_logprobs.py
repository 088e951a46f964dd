"""A step's prompt logprobs (`SamplingParams.prompt_logprobs`): the logprobs of the prompt tokens
this step computes, from the hidden states of the positions before them. A prompt split over
chunked-prefill steps is scored chunk by chunk. `prompt_logprob_spans` is the rule of which
positions a step scores (also for workers that compute the logits themselves, hallm.worker_api);
`add_prompt_logprobs` is the core runner's use of it."""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import torch

from hallm.core.input_batch import CachedRequestState
from hallm.core.logprobs import compute_prompt_logprobs
from hallm.core.scheduler_output import SchedulerOutput
from hallm.core.step_handle import StepHandle


@dataclasses.dataclass(frozen=True)
class PromptLogprobSpan:
    """One request's prompt positions scored this step."""

    req_id: str
    k: int  # top logprobs per position (the request's `prompt_logprobs`)
    start: int  # the first position's row in the step's packed hidden states
    targets: np.ndarray  # [num] the prompt token ids those positions predict; empty: none this step

    @property
    def num(self) -> int:
        return len(self.targets)


def prompt_logprob_spans(
    states: list[CachedRequestState], step: SchedulerOutput, layout: Any
) -> list[PromptLogprobSpan]:
    """For each request in `states` (the step's rows, in order) that asks for prompt logprobs and
    whose prompt this step reaches: its span. Position p's logits predict token p+1, so the
    prompt's first token has no logprob and a chunk holding only the prompt's last token scores
    nothing (an empty span, whose result is empty)."""
    spans = []
    for i, st in enumerate(states):
        k = st.params.prompt_logprobs
        c = st.num_computed_tokens
        if k is None or c >= st.num_prompt_tokens:
            continue
        end = min(c + step.num_scheduled_tokens[st.req_id], st.num_prompt_tokens - 1)
        targets = st.token_ids[c + 1 : end + 1] if end > c else st.token_ids[:0]
        spans.append(PromptLogprobSpan(st.req_id, k, int(layout.query_start_loc[i]), targets))
    return spans


def add_prompt_logprobs(
    model: Any,
    states: list[CachedRequestState],
    step: SchedulerOutput,
    layout: Any,
    hidden: torch.Tensor,
    handle: StepHandle,
) -> None:
    """Each span's logprobs into `handle.prompt_slots` for the host copy (an empty span's empty
    result straight into the step's output)."""
    for span in prompt_logprob_spans(states, step, layout):
        if not span.num:
            handle.output.prompt_logprobs[span.req_id] = ([], [], [])
            continue
        logits = model.compute_logits(hidden[span.start : span.start + span.num])
        targets = torch.from_numpy(span.targets).to(hidden.device, non_blocking=True)
        lp = compute_prompt_logprobs(logits, targets, span.k)
        handle.prompt_slots.append((span.req_id, handle.add_host(lp.token_ids, lp.logprobs, lp.sampled_rank)))
