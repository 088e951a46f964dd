"""Continuous batching under one token budget per step.

Prefill and decode are the same thing here: a number of tokens to compute for a request. Running
requests are served first (in arrival order), then waiting ones are admitted FCFS while the token
budget, `max_num_seqs` and the KV pool allow. A long prompt is chunked to fit the budget. When
blocks run out, the newest running request is preempted: its blocks are freed and it is
recomputed later from its prompt plus the tokens it already produced, so its output is the same.
"""

from __future__ import annotations

from collections import deque

from hallm.core.config import CacheConfig, SchedulerConfig
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

        for request in list(self.running):
            if budget == 0:
                break
            if request.status != RequestStatus.RUNNING:
                continue  # preempted earlier in this loop
            num_new = min(request.num_tokens - request.num_computed_tokens, budget)
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

        # Admit waiting requests only when nothing was preempted: a preemption means the pool
        # is full, and admitting would just preempt again.
        while self.waiting and budget > 0 and not preempted and len(self.running) < self.config.max_num_seqs:
            request = self.waiting[0]
            computed_blocks, num_hit = ([], 0)
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

        # Batch order: new requests first, then the running ones (the workers follow this order).
        ordered = {r.req_id: num_scheduled[r.req_id] for r in new_reqs}
        ordered.update((r.req_id, num_scheduled[r.req_id]) for r in cached_reqs)
        finished, self._finished_ids = self._finished_ids, set()
        # A request preempted and re-admitted in one step is rebuilt from NewRequestData.
        return SchedulerOutput(
            new_requests=new_reqs,
            cached_requests=cached_reqs,
            num_scheduled_tokens=ordered,
            total_num_scheduled_tokens=sum(ordered.values()),
            finished_req_ids=finished,
        )

    def update(self, step: SchedulerOutput, output: ModelRunnerOutput) -> list[Request]:
        """Advance the scheduled requests; return those that produced a token or finished."""
        touched: list[Request] = []
        for req_id, num_tokens in step.num_scheduled_tokens.items():
            request = self.requests.get(req_id)
            if request is None or request.status != RequestStatus.RUNNING:
                continue
            request.num_computed_tokens += num_tokens
            token = output.sampled_token_ids.get(req_id)
            if token is None:
                if req_id in output.prompt_logprobs:
                    touched.append(request)
                continue
            request.append_output_token(token)
            if request.check_stop():
                self.running.remove(request)
                del self.requests[req_id]
                self._free(request)
            touched.append(request)
        return touched
