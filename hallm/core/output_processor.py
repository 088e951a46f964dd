"""Turns sampled tokens into user-facing outputs: detokenization, stop strings, logprobs.

Runs in the engine's process after each step. `process` updates the sequences a step touched;
the caller then renders the parents that changed: as `RequestOutput`s (the whole state so far,
vLLM's shape; `outputs`, `finished_outputs`) or as `RequestDelta`s (only what is new since the
previous delta: what the serving engine process sends, with text work left to the API process).
A request with `n` > 1 is one parent with `n` child sequences; its RequestOutput lists all `n`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from hallm.core.detokenizer import IncrementalDetokenizer, decode_logprob_token
from hallm.core.engine_protocol import RequestDelta, TokenLogprobs
from hallm.core.outputs import CompletionOutput, Logprob, ModelRunnerOutput, PositionLogprobs, RequestOutput
from hallm.core.request import Request, RequestStatus
from hallm.core.scheduler_output import SchedulerOutput


@dataclasses.dataclass
class SequenceState:
    index: int
    request: Request
    detokenizer: IncrementalDetokenizer | None
    logprobs: list[PositionLogprobs] | None
    cumulative_logprob: float | None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    #: Output tokens (and their logprobs) already rendered as deltas.
    num_reported: int = 0
    prompt_logprobs_reported: bool = False


@dataclasses.dataclass
class ParentState:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    children: list[SequenceState]
    prompt_logprobs: list[PositionLogprobs | None] | None

    @property
    def finished(self) -> bool:
        return all(c.finish_reason is not None for c in self.children)


class OutputProcessor:
    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.parents: dict[str, ParentState] = {}
        self.child_to_parent: dict[str, tuple[ParentState, SequenceState]] = {}

    def add(self, request_id: str, prompt: str | None, children: list[Request]) -> None:
        first = children[0]
        params = first.sampling_params
        parent = ParentState(
            request_id=request_id,
            prompt=prompt,
            prompt_token_ids=first.prompt_token_ids,
            children=[],
            prompt_logprobs=[None] if params.prompt_logprobs is not None else None,
        )
        for i, child in enumerate(children):
            detok = None
            if params.detokenize and self.tokenizer is not None:
                # Deferred: text decoded at its first read, which for the offline API (outputs
                # of finished requests only) is one decode per sequence, not a step per token.
                detok = IncrementalDetokenizer(self.tokenizer, child.prompt_token_ids, params, deferred=True)
            seq = SequenceState(
                index=i,
                request=child,
                detokenizer=detok,
                logprobs=[] if params.logprobs is not None else None,
                cumulative_logprob=0.0 if params.logprobs is not None else None,
            )
            parent.children.append(seq)
            self.child_to_parent[child.request_id] = (parent, seq)
        self.parents[request_id] = parent

    def child_ids(self, request_id: str) -> list[str]:
        parent = self.parents.get(request_id)
        return [c.request.request_id for c in parent.children] if parent else []

    def process(
        self,
        touched: list[Request],
        output: ModelRunnerOutput,
        step: SchedulerOutput | None = None,
    ) -> tuple[list[ParentState], list[str]]:
        """Update the touched sequences; return (the changed parents, ids stopped by a stop string).

        `step` is the scheduled step `output` belongs to; it places prompt logprobs (with async
        scheduling a request's progress may already count the next step). Without it they are
        placed by the request's progress. Render the changed parents with `outputs`,
        `finished_outputs` or `deltas`: each releases the parents that finished.
        """
        changed: dict[str, ParentState] = {}
        stopped: list[str] = []
        computed_after: dict[str, int] = {}
        if output.prompt_logprobs and step is not None:
            scheduled: list[Any] = [*step.new_requests, *step.cached_requests]
            for data in scheduled:
                if data.req_id in output.prompt_logprobs:
                    computed_after[data.req_id] = (
                        data.num_computed_tokens + step.num_scheduled_tokens[data.req_id]
                    )
        for request in touched:
            entry = self.child_to_parent.get(request.request_id)
            if entry is None:
                continue
            parent, seq = entry
            changed[parent.request_id] = parent
            if (
                request.request_id in output.prompt_logprobs
                and parent.prompt_logprobs is not None
                and seq.index == 0
            ):
                ids, vals, ranks = output.prompt_logprobs[request.request_id]
                # By position, not appended: a request preempted and resumed computes (and
                # scores) its prompt again, which must overwrite, not repeat, what it gave.
                computed = computed_after.get(request.request_id, request.num_computed_tokens)
                end = min(computed, request.num_prompt_tokens - 1) + 1
                parent.prompt_logprobs[end - len(ids) : end] = [
                    self._position_logprobs(i, v, r) for i, v, r in zip(ids, vals, ranks, strict=True)
                ]
            token = output.sampled_token_ids.get(request.request_id)
            if token is None:
                continue
            if seq.logprobs is not None and request.request_id in output.logprobs:
                lp_ids, lp_vals, lp_rank = output.logprobs[request.request_id]
                seq.logprobs.append(self._position_logprobs(lp_ids, lp_vals, lp_rank))
                seq.cumulative_logprob = (seq.cumulative_logprob or 0.0) + lp_vals[0]
            if seq.detokenizer is not None:
                # A token-level stop (EOS, a stop token id) leaves the token's text out unless
                # include_stop_str_in_output; update() also applies the stop strings.
                stop_terminated = request.status == RequestStatus.FINISHED_STOPPED
                seq.detokenizer.update([token], stop_terminated=stop_terminated)
                hit = seq.detokenizer.stop_string
                if hit is not None:
                    # The text is cut at the stop string even when this token also ended the
                    # request (max_tokens, EOS): then it finished on the stop string (vLLM).
                    seq.finish_reason = RequestStatus.FINISHED_STOPPED.finish_reason
                    seq.stop_reason = hit
                    if not request.status.finished:
                        stopped.append(request.request_id)
            if request.status.finished and seq.finish_reason is None:
                seq.finish_reason = request.status.finish_reason
                seq.stop_reason = request.stop_reason
            if seq.finish_reason is not None and seq.detokenizer is not None:
                seq.detokenizer.flush()  # releases the text held back for stop strings
        return list(changed.values()), stopped

    def outputs(self, changed: list[ParentState]) -> list[RequestOutput]:
        """The whole state of every changed parent."""
        return [self._make_output(p) for p in changed]

    def finished_outputs(self, changed: list[ParentState]) -> list[RequestOutput]:
        """The outputs of the parents that finished (the offline API reads nothing else; building
        the others costs a copy of every token list)."""
        return [self._make_output(p) for p in changed if p.finished]

    def deltas(self, changed: list[ParentState]) -> list[RequestDelta]:
        """What each changed request gained since its previous delta: new token ids (and their
        logprobs), the prompt's logprobs once they are complete, the finish reason at the end.
        A request with nothing new (a prompt chunk) has no delta. One sequence per request (the
        serving engine process queues each of `n` samples as a request of its own)."""
        for parent in changed:  # before anything is rendered (and released)
            if len(parent.children) != 1:
                raise ValueError(
                    f"request {parent.request_id!r} has {len(parent.children)} sequences; deltas are"
                    " rendered for requests with n=1 (queue each sample as a request of its own)"
                )
        deltas: list[RequestDelta] = []
        for parent in changed:
            seq = parent.children[0]
            tokens = seq.request.output_token_ids
            start = seq.num_reported
            finished = seq.finish_reason is not None
            prompt_logprobs = None
            if (
                parent.prompt_logprobs is not None
                and not seq.prompt_logprobs_reported
                and (tokens or finished)
            ):
                # The prompt is scored before the first token is sampled: sent once, complete.
                seq.prompt_logprobs_reported = True
                prompt_logprobs = [
                    None if pos is None else _token_logprobs(pos) for pos in parent.prompt_logprobs
                ]
            if len(tokens) == start and not finished and prompt_logprobs is None:
                continue
            seq.num_reported = len(tokens)
            deltas.append(
                RequestDelta(
                    request_id=parent.request_id,
                    token_ids=tokens[start:],
                    logprobs=None
                    if seq.logprobs is None
                    else [_token_logprobs(p) for p in seq.logprobs[start:]],
                    finish_reason=seq.finish_reason,
                    stop_reason=seq.stop_reason,
                    num_cached_tokens=max(0, seq.request.num_cached_tokens),
                    prompt_logprobs=prompt_logprobs,
                )
            )
            if finished:
                self._release(parent)
        return deltas

    def finish_aborted(self, request_ids: list[str]) -> list[RequestOutput]:
        outs = []
        for rid in request_ids:
            parent = self.parents.get(rid)
            if parent is None:
                continue
            for seq in parent.children:
                if seq.finish_reason is None:
                    seq.finish_reason = RequestStatus.FINISHED_ABORTED.finish_reason
                    if seq.detokenizer is not None:
                        seq.detokenizer.flush()
            outs.append(self._make_output(parent))
        return outs

    def _position_logprobs(self, ids: list[int], vals: list[float], rank: int) -> PositionLogprobs:
        # Entry 0 is the chosen token with its rank; the rest are the top-k, ranked 1..k.
        out: PositionLogprobs = {}
        for j, (tid, val) in enumerate(zip(ids, vals, strict=True)):
            if tid in out:
                continue
            out[tid] = Logprob(val, rank if j == 0 else j, decode_logprob_token(self.tokenizer, tid))
        return out

    def _make_output(self, parent: ParentState) -> RequestOutput:
        outputs = [
            CompletionOutput(
                index=seq.index,
                text=_text(seq),
                token_ids=list(seq.request.output_token_ids),
                cumulative_logprob=seq.cumulative_logprob,
                logprobs=seq.logprobs,
                finish_reason=seq.finish_reason,
                stop_reason=seq.stop_reason,
            )
            for seq in parent.children
        ]
        finished = parent.finished
        if finished:
            self._release(parent)
        return RequestOutput(
            request_id=parent.request_id,
            prompt=parent.prompt,
            prompt_token_ids=parent.prompt_token_ids,
            prompt_logprobs=parent.prompt_logprobs,
            outputs=outputs,
            finished=finished,
            num_cached_tokens=max(0, parent.children[0].request.num_cached_tokens),
        )

    def _release(self, parent: ParentState) -> None:
        self.parents.pop(parent.request_id, None)
        for seq in parent.children:
            self.child_to_parent.pop(seq.request.request_id, None)


def _token_logprobs(pos: PositionLogprobs) -> TokenLogprobs:
    # `_position_logprobs` ranks every entry, so no rank is None here.
    return TokenLogprobs(
        list(pos), [lp.logprob for lp in pos.values()], [lp.rank or 0 for lp in pos.values()]
    )


def _text(seq: SequenceState) -> str:
    """All the text once finished; while streaming, only what no later stop string can cut."""
    if seq.detokenizer is None:
        return ""
    return seq.detokenizer.output_text if seq.finish_reason is not None else seq.detokenizer.visible_text
