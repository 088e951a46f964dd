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

With a KV connector (hallm.platforms.kv_connector), a request whose prompt KV beyond the local
prefix-cache hit can be loaded from outside is admitted in two steps: a load step (blocks
allocated, nothing computed, status WAITING_FOR_KV) and, once the workers report the load,
ordinary admission from the front of the queue with those tokens computed. A failed load leaves
them to compute. The connector's scheduler side is told when a prompt is fully computed (it may
save it) and when a request finishes (it may keep its blocks until a send completes). With async
scheduling the load step's result is only known after the next step is scheduled: the request
stays in `loading` (scheduled in no step) until `update` applies it, so it never computes on a
load that may fail; the save instruction is given before `_advance`, from the tokens computed
before the step, as in sync mode.
"""

from __future__ import annotations

import logging
from collections import Counter, deque

from hallm.core.config import CacheConfig, SchedulerConfig
from hallm.core.kv_cache.block_pool import KVBlock
from hallm.core.kv_cache.manager import KVCacheManager
from hallm.core.outputs import ModelRunnerOutput
from hallm.core.request import Request, RequestStatus
from hallm.core.scheduler_output import CachedRequestData, NewRequestData, SchedulerOutput
from hallm.platforms import KVConnector

logger = logging.getLogger("hallm.scheduler")


class Scheduler:
    def __init__(
        self,
        scheduler_config: SchedulerConfig,
        cache_config: CacheConfig,
        max_model_len: int,
        connector: KVConnector | None = None,
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
        self.connector = connector
        self.loading: dict[str, tuple[Request, int]] = {}  # id -> (request, tokens being loaded)
        self._load_ids: list[str] = []  # loads started by the step being scheduled
        self._held: dict[str, Request] = {}  # finished, blocks kept until the connector's send ends
        # The connector's counters, both sides added up (see KVConnector.take_stats), plus the
        # engine's own: tokens_loaded, load_failures.
        self.kv_connector_stats: Counter[str] = Counter()

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
            elif request.status == RequestStatus.WAITING_FOR_KV:
                self.loading.pop(rid, None)
            else:
                self.waiting.remove(request)
            request.status = status
            self._free(request, finished=True)
            done.append(request)
        return done

    def has_unfinished_requests(self) -> bool:
        return bool(self.waiting or self.running or self.loading)

    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    def _free(self, request: Request, finished: bool = False) -> None:
        if (
            finished
            and self.connector is not None
            and self.connector.on_request_finished(request, self.kv.block_ids(request.request_id))
        ):
            self._held[request.request_id] = request  # freed when the connector's send ends
        else:
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
            self._maybe_save(request, num_new)
            if self.async_scheduling:
                scheduled[request.request_id] = request
                self._advance(request, num_new)

        # Admit waiting requests only when nothing was preempted: a preemption means the pool
        # is full, and admitting would just preempt again.
        while (
            self.waiting
            and budget > 0
            and not preempted
            and len(self.running) + len(self.loading) < self.config.max_num_seqs
        ):
            request = self.waiting[0]
            if request.num_pending_tokens:
                break  # preempted with a token in flight: admitted once it resolves
            computed_blocks: list[KVBlock] = []
            num_hit = 0
            # A request that holds blocks already comes back from a load step (loaded or not).
            if request.num_computed_tokens == 0 and not self.kv.holds_blocks(request):
                computed_blocks, num_hit = self.kv.get_computed_blocks(request)
                num_external = self._num_external_tokens(request, num_hit)
                if num_external:
                    if not self._start_load(request, computed_blocks, num_hit, num_external):
                        break
                    continue
            num_new = request.num_tokens - request.num_computed_tokens - num_hit
            if num_new > budget and not self.config.enable_chunked_prefill:
                break
            num_new = min(num_new, budget)
            block_ids = self.kv.allocate_slots(request, num_new, computed_blocks)
            if block_ids is None:
                if self._release_waiting_blocks(request):
                    continue
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
            self._maybe_save(request, num_new)
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
            kv_connector_meta=self.connector.build_step_meta() if self.connector is not None else None,
            kv_load_req_ids=self._load_ids,
        )
        self._load_ids = []
        if self.async_scheduling and scheduled:
            self._in_flight[id(step)] = scheduled
        return step

    # ---- KV connector -----------------------------------------------------------------------

    def _num_external_tokens(self, request: Request, num_hit: int) -> int:
        """Prompt tokens after the local hit that the connector can load (at least one token is
        left to compute; a prompt-logprobs request computes its whole prompt)."""
        if self.connector is None or request.sampling_params.prompt_logprobs is not None:
            return 0
        n = int(self.connector.num_external_tokens(request, num_hit))
        return max(0, min(n, request.num_tokens - 1 - num_hit))

    def _start_load(
        self, request: Request, computed_blocks: list[KVBlock], num_hit: int, num_external: int
    ) -> bool:
        """Admit `request` for a load step; False when the pool has no room for it now."""
        assert self.connector is not None
        if self.kv.allocate_slots(request, num_external, computed_blocks, defer_caching=True) is None:
            return False
        self.waiting.popleft()
        if request.num_cached_tokens < 0:
            request.num_cached_tokens = num_hit
        request.num_computed_tokens = num_hit
        request.status = RequestStatus.WAITING_FOR_KV
        self.loading[request.request_id] = (request, num_external)
        self._load_ids.append(request.request_id)
        self.connector.on_blocks_allocated(request, self.kv.block_ids(request.request_id), num_external)
        return True

    def _release_waiting_blocks(self, head: Request) -> bool:
        """The queue's head does not fit: free the blocks of waiting requests back from a load
        step (loaded blocks stay findable in the prefix cache), so they cannot starve it."""
        released = False
        for request in self.waiting:
            if request is not head and self.kv.holds_blocks(request):
                self.kv.free(request)
                request.num_computed_tokens = 0
                released = True
        return released

    def _maybe_save(self, request: Request, num_new: int) -> None:
        """Tell the connector when this step completes the request's prompt (it may save it)."""
        if self.connector is None:
            return
        c = request.num_computed_tokens
        if c < request.num_prompt_tokens <= c + num_new:
            self.connector.on_blocks_allocated(request, self.kv.block_ids(request.request_id), 0)

    def _update_kv_connector(self, step: SchedulerOutput, output: ModelRunnerOutput) -> None:
        """Apply a step's load results, free requests whose sends ended, add up the counters."""
        stats = self.kv_connector_stats
        for req_id in step.kv_load_req_ids:
            entry = self.loading.pop(req_id, None)
            if entry is None:
                continue  # aborted during its load step
            request, num_external = entry
            if req_id in output.kv_loaded:
                request.num_computed_tokens += num_external
                if request.num_preemptions == 0:
                    request.num_cached_tokens += num_external
                self.kv.cache_blocks(request, request.num_computed_tokens)
                stats["tokens_loaded"] += num_external
            else:
                stats["load_failures"] += 1
                logger.warning(
                    "KV load of %d tokens for request %s failed; computing them instead", num_external, req_id
                )
            request.status = RequestStatus.WAITING
            self.waiting.appendleft(request)
        for req_id in output.kv_finished_sending:
            held = self._held.pop(req_id, None)
            if held is not None:
                self.kv.free(held)
        stats.update(output.kv_connector_stats)
        if self.connector is not None:
            stats.update(self.connector.take_stats())

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
        if self.connector is not None:
            self._update_kv_connector(step, output)
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
            self._free(request, finished=True)
        touched.append(request)
