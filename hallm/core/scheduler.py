"""Continuous batching under one token budget per step.

Prefill and decode are the same thing here: a number of tokens to compute for a request. Running
requests are served first (in arrival order), then waiting ones are admitted FCFS while the token
budget, `max_num_seqs` and the KV pool allow. A long prompt is chunked to fit the budget. When
blocks run out, the newest running request is preempted: its blocks are freed and it is
recomputed later from its prompt plus the tokens it already produced, so its output is the same.

With `async_scheduling` the engine schedules step N+1 before step N's sampled tokens are known
(the device is still running step N). Then a request's `num_computed_tokens` advances when it is
scheduled, and a step that will sample a token for it leaves a placeholder
(`num_pending_tokens`) that the next step may already compute on: the workers feed it the id
sampled on the device. `update` fills the placeholder in. A request that stops on a token only
known then (EOS, a stop token or string) may already be in the next step: that step's token for
it is dropped. One whose pending token is its last (max_tokens) is not scheduled again.
"""

from __future__ import annotations

from collections import deque

from hallm.core.config import CacheConfig, SchedulerConfig
from hallm.core.kv_cache.block_pool import KVBlock
from hallm.core.kv_cache.manager import KVCacheManager
from hallm.core.outputs import ModelRunnerOutput
from hallm.core.request import Request, RequestStatus
from hallm.core.scheduler_output import CachedRequestData, NewRequestData, SchedulerOutput


class Scheduler:
    def __init__(
        self, scheduler_config: SchedulerConfig, cache_config: CacheConfig, max_model_len: int
    ) -> None:
        self.config = scheduler_config
        self.max_model_len = max_model_len
        self.kv = KVCacheManager(
            cache_config.num_blocks, cache_config.block_size, cache_config.enable_prefix_caching
        )
        self.requests: dict[str, Request] = {}
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self._finished_ids: set[str] = set()  # to tell the workers next step
        self.num_preemptions = 0
        self.async_scheduling = scheduler_config.async_scheduling
        # id(step) -> the requests it scheduled, by id: `update` applies a step's tokens only to
        # those very objects (a finished request's id may be reused before its step resolves).
        self._in_flight: dict[int, dict[str, Request]] = {}

    # ---- queue management -------------------------------------------------------------------

    def add_request(self, request: Request) -> None:
        self.requests[request.request_id] = request
        self.waiting.append(request)

    def finish_requests(self, request_ids: list[str], status: RequestStatus) -> list[Request]:
        """Finish (abort, or stop on a stop string) requests by id; unknown ids are ignored."""
        done = []
        for rid in request_ids:
            request = self.requests.pop(rid, None)
            if request is None:
                continue
            if request.status == RequestStatus.RUNNING:
                self.running.remove(request)
            else:
                self.waiting.remove(request)
            request.status = status
            self._free(request)
            done.append(request)
        return done

    def has_unfinished_requests(self) -> bool:
        return bool(self.waiting or self.running)

    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    def _free(self, request: Request) -> None:
        self.kv.free(request)
        self._finished_ids.add(request.request_id)

    def _preempt(self, request: Request) -> None:
        self.running.remove(request)
        self._free(request)
        request.status = RequestStatus.PREEMPTED
        request.num_computed_tokens = 0
        request.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(request)

    # ---- one step ---------------------------------------------------------------------------

    def schedule(self) -> SchedulerOutput:
        budget = self.config.max_num_batched_tokens
        num_scheduled: dict[str, int] = {}
        new_reqs: list[NewRequestData] = []
        cached_reqs: list[CachedRequestData] = []
        preempted = False

        scheduled: dict[str, Request] = {}
        for request in list(self.running):
            if budget == 0:
                break
            if request.status != RequestStatus.RUNNING:
                continue  # preempted earlier in this loop
            pending = request.num_pending_tokens
            if pending and request.num_output_tokens + pending >= request.max_tokens:
                continue  # its last token is in flight: it finishes when that resolves
            num_new = min(request.num_tokens + pending - request.num_computed_tokens, budget)
            while True:
                new_block_ids = self.kv.allocate_slots(request, num_new)
                if new_block_ids is not None:
                    break
                victim = self.running[-1]
                self._preempt(victim)
                preempted = True
                if victim is request:
                    break
            if new_block_ids is None:
                continue
            num_scheduled[request.request_id] = num_new
            budget -= num_new
            cached_reqs.append(
                CachedRequestData(request.request_id, new_block_ids, request.num_computed_tokens)
            )
            if self.async_scheduling:
                scheduled[request.request_id] = request
                self._advance(request, num_new)

        # Admit waiting requests only when nothing was preempted: a preemption means the pool
        # is full, and admitting would just preempt again.
        while self.waiting and budget > 0 and not preempted and len(self.running) < self.config.max_num_seqs:
            request = self.waiting[0]
            if request.num_pending_tokens:
                break  # preempted with a token in flight: admitted once it resolves
            computed_blocks: list[KVBlock] = []
            num_hit = 0
            if request.num_computed_tokens == 0:
                computed_blocks, num_hit = self.kv.get_computed_blocks(request)
            num_new = request.num_tokens - request.num_computed_tokens - num_hit
            if num_new > budget and not self.config.enable_chunked_prefill:
                break
            num_new = min(num_new, budget)
            block_ids = self.kv.allocate_slots(request, num_new, computed_blocks)
            if block_ids is None:
                break
            self.waiting.popleft()
            if request.num_cached_tokens < 0:
                request.num_cached_tokens = num_hit
            request.num_computed_tokens += num_hit
            request.status = RequestStatus.RUNNING
            self.running.append(request)
            num_scheduled[request.request_id] = num_new
            budget -= num_new
            new_reqs.append(
                NewRequestData(
                    req_id=request.request_id,
                    prompt_token_ids=request.prompt_token_ids,
                    output_token_ids=list(request.output_token_ids),
                    sampling_params=request.sampling_params,
                    block_ids=self.kv.block_ids(request.request_id),
                    num_computed_tokens=request.num_computed_tokens,
                    eos_token_ids=request.eos_token_ids,
                )
            )
            if self.async_scheduling:
                scheduled[request.request_id] = request
                self._advance(request, num_new)

        # Batch order: new requests first, then the running ones (the workers follow this order).
        ordered = {r.req_id: num_scheduled[r.req_id] for r in new_reqs}
        ordered.update((r.req_id, num_scheduled[r.req_id]) for r in cached_reqs)
        finished, self._finished_ids = self._finished_ids, set()
        # A request preempted and re-admitted in one step is rebuilt from NewRequestData.
        step = SchedulerOutput(
            new_requests=new_reqs,
            cached_requests=cached_reqs,
            num_scheduled_tokens=ordered,
            total_num_scheduled_tokens=sum(ordered.values()),
            finished_req_ids=finished,
        )
        if self.async_scheduling and scheduled:
            self._in_flight[id(step)] = scheduled
        return step

    def _advance(self, request: Request, num_new: int) -> None:
        """Async scheduling: count a scheduled chunk as computed now; reaching the end of the
        request's tokens means the step samples one more (a placeholder until `update`)."""
        request.num_computed_tokens += num_new
        if request.num_computed_tokens >= request.num_tokens + request.num_pending_tokens:
            request.num_pending_tokens += 1

    def update(self, step: SchedulerOutput, output: ModelRunnerOutput) -> list[Request]:
        """Advance the scheduled requests; return those that produced a token or finished."""
        touched: list[Request] = []
        sampled = output.sampled_token_ids
        if self.async_scheduling:
            scheduled = self._in_flight.pop(id(step), {})
            for req_id in step.num_scheduled_tokens:  # batch order, as in sync mode
                request = scheduled.get(req_id)
                if request is None or self.requests.get(req_id) is not request:
                    continue  # finished (stopped, aborted) while its step ran
                token = sampled.get(req_id)
                if token is None:
                    if req_id in output.prompt_logprobs:
                        touched.append(request)
                    continue
                # A request preempted after this step was scheduled keeps its token: it resumes
                # from its prompt plus every token it produced, as in sync mode.
                request.num_pending_tokens -= 1
                self._append(request, token, touched)
            return touched
        for req_id, num_tokens in step.num_scheduled_tokens.items():
            request = self.requests.get(req_id)
            if request is None or request.status != RequestStatus.RUNNING:
                continue
            request.num_computed_tokens += num_tokens
            token = sampled.get(req_id)
            if token is None:
                if req_id in output.prompt_logprobs:
                    touched.append(request)
                continue
            self._append(request, token, touched)
        return touched

    def _append(self, request: Request, token: int, touched: list[Request]) -> None:
        request.append_output_token(token)
        if request.check_stop():
            if request in self.running:
                self.running.remove(request)
            else:  # async: preempted after its step was scheduled
                self.waiting.remove(request)
            del self.requests[request.request_id]
            self._free(request)
        touched.append(request)
