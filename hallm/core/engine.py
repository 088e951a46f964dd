"""LLMEngine: requests in, outputs out, one `step()` at a time.

It owns the scheduler, the executor (which owns the workers), the tokenizer and the output
processor. It validates every request before accepting it, so bad input is refused with a
clear error and never disturbs the requests already running.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from hallm.core.admission import AdmissionLimits, InvalidRequestError, check_admission
from hallm.core.config import EngineConfig
from hallm.core.engine_args import EngineArgs
from hallm.core.engine_protocol import RequestDelta
from hallm.core.output_processor import OutputProcessor, ParentState
from hallm.core.outputs import RequestOutput
from hallm.core.request import Request, RequestStatus
from hallm.core.sampling_params import SamplingParams
from hallm.core.scheduler import Scheduler
from hallm.core.scheduler_output import SchedulerOutput
from hallm.platforms import ConfigError, Executor, KVConnector, KVConnectorRole
from hallm.platforms.registry import platform_from_choice

logger = logging.getLogger("hallm.engine")

PromptType = str | Sequence[int] | dict[str, Any]
T = TypeVar("T")


class LLMEngine:
    def __init__(self, config: EngineConfig, tokenizer: Any) -> None:
        self.config = config
        self.tokenizer = tokenizer
        platform_cls = platform_from_choice(config.device)
        self.platform = platform_cls()
        self.executor = self._make_executor()
        self.executor.start()
        config.cache.num_blocks = self._num_blocks()
        config.cache.bytes_per_block = self.executor.kv_cache_bytes_per_block()
        self.executor.init_kv_cache(config.cache.num_blocks)
        self.scheduler = Scheduler(config.scheduler, config.cache, config.model.max_model_len)
        self.output_processor = OutputProcessor(tokenizer)
        self.eos_token_ids = self._eos_token_ids()
        # Async scheduling needs an executor that can launch a step without waiting for it.
        self.async_scheduling = config.scheduler.async_scheduling and self.executor.supports_async
        self.scheduler.async_scheduling = self.async_scheduling
        # The launched step whose results are not processed yet: (step, handle with .get()).
        self._in_flight: tuple[SchedulerOutput, Any] | None = None
        if self.platform.warm_up_at_start():
            from hallm.core.warmup import warm_up

            warm_up(self)
        # After the warm-up, whose dummy prompts are nobody's KV to save.
        self.scheduler.connector = self._make_kv_connector()

    @classmethod
    def from_engine_args(cls, args: EngineArgs) -> LLMEngine:
        from hallm.core.model_loader import load_tokenizer

        config = args.create_engine_config()
        tokenizer = (
            None if args.skip_tokenizer_init else load_tokenizer(config.model.tokenizer or config.model.model)
        )
        return cls(config, tokenizer)

    # ---- setup ------------------------------------------------------------------------------

    def _make_executor(self) -> Executor:
        from hallm.core.executors import BUILTIN_EXECUTORS
        from hallm.platforms.registry import executors as contributed_executors

        available = {**BUILTIN_EXECUTORS, **contributed_executors()}
        name = self.config.parallel.distributed_executor_backend
        if name == "ray" and name not in available:  # Ray is an extra: imported only when chosen
            from hallm.core.executors.ray import RayExecutor

            available[name] = RayExecutor
        if name not in available:
            raise ConfigError(f"unknown executor {name!r}; available: {sorted(available)}")
        return available[name](self.config, self.platform)

    def _make_kv_connector(self) -> KVConnector | None:
        from hallm.core.kv_connectors import create_connector

        connector = create_connector(self.config, KVConnectorRole.SCHEDULER)
        if connector is not None:
            kv = self.config.kv_transfer
            assert kv is not None
            logger.info("KV connector: %s (%s)", kv.kv_connector, kv.kv_role)
        return connector

    def _num_blocks(self) -> int:
        cache = self.config.cache
        per_block = self.executor.kv_cache_bytes_per_block()
        if cache.num_gpu_blocks_override is not None:
            num_blocks = cache.num_gpu_blocks_override
            why = "--num-gpu-blocks-override"
        else:
            budget = self.executor.available_kv_cache_bytes()
            why = f"the free memory under --gpu-memory-utilization {cache.gpu_memory_utilization}"
            cap, cap_why = cache.kv_cache_memory_bytes, "--kv-cache-memory-bytes"
            if cap is None:
                cap = self.platform.default_kv_cache_bytes()
                cap_why = f"the {self.platform.name} default (--kv-cache-memory-bytes changes it)"
            if cap is not None and cap < budget:
                budget, why = cap, f"{cap / 2**30:.2f} GiB: {cap_why}"
            num_blocks = budget // per_block
            # More blocks than every sequence at full length can use is wasted memory.
            ceiling = self.config.scheduler.max_num_seqs * -(
                -self.config.model.max_model_len // cache.block_size
            )
            if ceiling + 1 < num_blocks:
                num_blocks, why = ceiling + 1, "what --max-num-seqs x --max-model-len can use"
        if num_blocks < 2:
            raise ConfigError(
                f"no room for the KV cache ({num_blocks} blocks of {per_block} bytes): raise "
                "--gpu-memory-utilization, lower --max-model-len, or use a smaller model"
            )
        logger.info(
            "KV cache: %d blocks of %d tokens (%.2f GiB), sized by %s",
            num_blocks,
            cache.block_size,
            num_blocks * per_block / 2**30,
            why,
        )
        return int(num_blocks)

    def _eos_token_ids(self) -> frozenset[int]:
        ids: set[int] = set()
        gen_eos = getattr(self.config.model.hf_config, "eos_token_id", None)
        for value in (getattr(self.tokenizer, "eos_token_id", None), gen_eos):
            if isinstance(value, int):
                ids.add(value)
            elif isinstance(value, list | tuple):
                ids.update(int(v) for v in value)
        return frozenset(ids)

    # ---- requests ---------------------------------------------------------------------------

    def tokenize_prompt(self, prompt: PromptType) -> tuple[str | None, list[int]]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise InvalidRequestError("this engine has no tokenizer; pass prompt_token_ids")
            return prompt, list(self.tokenizer.encode(prompt))
        if isinstance(prompt, dict):
            if "prompt_token_ids" in prompt:
                return prompt.get("prompt"), self._check_token_ids(prompt["prompt_token_ids"])
            if "prompt" in prompt:
                return self.tokenize_prompt(prompt["prompt"])
            raise InvalidRequestError("a prompt dict needs 'prompt' or 'prompt_token_ids'")
        return None, self._check_token_ids(prompt)

    def _check_token_ids(self, ids: Any) -> list[int]:
        if isinstance(ids, str | bytes) or not isinstance(ids, Sequence):
            raise InvalidRequestError(f"prompt_token_ids must be a list of ints, got {type(ids).__name__}")
        out = list(ids)
        # The common case in a C loop (a 1,024-id prompt in ~15 us, not a Python check per id);
        # the ids' range is `check_admission`'s, which every added request goes through.
        if not out or set(map(type, out)) == {int}:
            return out
        vocab = int(self.config.model.hf_config.vocab_size)
        checked = []  # int subclasses (not bool) are converted; anything else is named
        for t in out:
            if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < vocab:
                raise InvalidRequestError(f"prompt_token_ids must be ints in [0, {vocab}), got {t!r}")
            checked.append(int(t))
        return checked

    def add_request(
        self,
        request_id: str,
        prompt: PromptType,
        params: SamplingParams | None = None,
        arrival_time: float | None = None,
    ) -> None:
        """Validate and queue a request. Raises InvalidRequestError (a ValueError) for bad input."""
        params = params or SamplingParams()
        if not isinstance(params, SamplingParams):
            raise InvalidRequestError(f"sampling_params must be SamplingParams, got {type(params).__name__}")
        if request_id in self.output_processor.parents:
            raise InvalidRequestError(f"request id {request_id!r} is already in use")
        text, token_ids = self.tokenize_prompt(prompt)
        self._queue(request_id, text, token_ids, params, arrival_time)

    def add_token_ids(self, request_id: str, token_ids: list[int], params: SamplingParams) -> None:
        """`add_request` for ids whose every item is known to be an int (a decoded
        `engine_protocol.AddRequest`, whose schema refuses anything else): no per-id type check,
        the admission checks still run. Raises InvalidRequestError for bad input."""
        if request_id in self.output_processor.parents:
            raise InvalidRequestError(f"request id {request_id!r} is already in use")
        self._queue(request_id, None, token_ids, params, None)

    def _queue(
        self,
        request_id: str,
        text: str | None,
        token_ids: list[int],
        params: SamplingParams,
        arrival_time: float | None,
    ) -> None:
        self._validate(token_ids, params, "prompt" if text is not None else "prompt_token_ids")
        children = []
        for i in range(params.n):
            child_params = params
            if params.n > 1:
                # Each sample is its own sequence; a seeded request gets distinct, reproducible seeds.
                child_params = params.clone()
                child_params.n = 1
                if params.seed is not None:
                    child_params.seed = params.seed + i
            child_id = request_id if params.n == 1 else f"{request_id}#{i}"
            children.append(
                Request(
                    child_id,
                    token_ids,
                    child_params,
                    self.eos_token_ids,
                    self.config.model.max_model_len,
                    arrival_time,
                )
            )
        self.output_processor.add(request_id, text, children)
        for child in children:
            self.scheduler.add_request(child)
        if logger.isEnabledFor(logging.DEBUG):
            logger.debug("add t=%.6f id=%s prompt=%d", time.perf_counter(), request_id, len(token_ids))

    def _validate(self, token_ids: list[int], params: SamplingParams, what: str) -> None:
        limits = AdmissionLimits(
            max_model_len=self.config.model.max_model_len,
            vocab_size=int(self.config.model.hf_config.vocab_size),
            block_size=self.config.cache.block_size,
            num_usable_blocks=self.scheduler.kv.num_usable_blocks,
            tokenizer=self.config.model.tokenizer or self.config.model.model,
        )
        check_admission(token_ids, params, limits, what)

    def abort_request(self, request_ids: str | Sequence[str]) -> list[RequestOutput]:
        ids = [request_ids] if isinstance(request_ids, str) else list(request_ids)
        child_ids = [c for rid in ids for c in self.output_processor.child_ids(rid)]
        self.scheduler.finish_requests(child_ids, RequestStatus.FINISHED_ABORTED)
        return self.output_processor.finish_aborted(ids)

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished_requests() or self._in_flight is not None

    # ---- the loop ---------------------------------------------------------------------------

    def step(self, final_only: bool = False) -> list[RequestOutput]:
        """Schedule, run one step on the executor, and return the requests that changed
        (`final_only`: only those that finished).

        With async scheduling, a call launches the next step first and then processes the
        previous one (whose device work ran while this call scheduled and prepared the next):
        outputs come one call later, and the host work of a step overlaps the device's. The
        tokens are the same; a request that stops on a token (EOS, stop token or string) may
        have been scheduled once more, and that step's token for it is dropped.
        """
        processor = self.output_processor
        return self._step(processor.finished_outputs if final_only else processor.outputs)

    def step_deltas(self) -> list[RequestDelta]:
        """`step()`, reporting only what each request gained since the previous call (new token
        ids, their logprobs, the finish reason), without building whole outputs: what the
        serving engine process sends. Requests must have n=1."""
        return self._step(self.output_processor.deltas)

    def _step(self, render: Callable[[list[ParentState]], list[T]]) -> list[T]:
        if self.async_scheduling:
            return self._step_async(render)
        step = self.scheduler.schedule()
        self._trace(step)
        if step.is_empty:
            if self.scheduler.has_unfinished_requests() and not step.finished_req_ids:
                raise RuntimeError("scheduler made no progress with requests pending (KV pool too small?)")
            self.executor.execute(step)  # lets the workers drop finished requests
            return []
        output = self.executor.execute(step)
        return self._process(step, output, render)

    def _process(
        self, step: SchedulerOutput, output: Any, render: Callable[[list[ParentState]], list[T]]
    ) -> list[T]:
        touched = self.scheduler.update(step, output)
        changed, stopped = self.output_processor.process(touched, output, step)
        if stopped:
            self.scheduler.finish_requests(stopped, RequestStatus.FINISHED_STOPPED)
        return render(changed)

    def _step_async(self, render: Callable[[list[ParentState]], list[T]]) -> list[T]:
        step = self.scheduler.schedule()
        self._trace(step)
        previous, self._in_flight = self._in_flight, None
        if not step.is_empty or step.finished_req_ids:
            handle = self.executor.execute_async(step)
            if not step.is_empty:
                self._in_flight = (step, handle)
        if previous is None:
            if step.is_empty and self.scheduler.has_unfinished_requests() and not step.finished_req_ids:
                raise RuntimeError("scheduler made no progress with requests pending (KV pool too small?)")
            return []
        prev_step, prev_handle = previous
        outputs = self._process(prev_step, prev_handle.get(), render)
        if self._in_flight is not None and not self.scheduler.has_unfinished_requests():
            # Every request it ran has finished since (on a token it could not know of yet):
            # finish it now, so that an idle engine holds no step.
            (last_step, last_handle), self._in_flight = self._in_flight, None
            outputs += self._process(last_step, last_handle.get(), render)
        return outputs

    def _trace(self, step: SchedulerOutput) -> None:
        """One debug line per scheduled step (`hallm --log-level debug`): when it was scheduled
        (`time.perf_counter`, one clock for every process on a Linux host), its tokens, those of
        rows with more than one (prompt chunks), its rows and the requests still waiting.
        `benchmarks/step_timeline.py` turns these lines into a timeline."""
        if not logger.isEnabledFor(logging.DEBUG) or step.is_empty:
            return
        counts = step.num_scheduled_tokens.values()
        logger.debug(
            "step t=%.6f tokens=%d prompt=%d rows=%d waiting=%d",
            time.perf_counter(),
            step.total_num_scheduled_tokens,
            sum(n for n in counts if n > 1),
            len(counts),
            self.scheduler.num_waiting,
        )

    def get_stats(self) -> dict[str, Any]:
        kv = self.scheduler.kv
        stats = kv.prefix_cache_stats
        return {
            "num_running": self.scheduler.num_running,
            "num_waiting": self.scheduler.num_waiting,
            "kv_cache_usage": kv.usage,
            "num_free_blocks": kv.num_free_blocks,
            "num_blocks": kv.num_blocks,
            "num_preemptions": self.scheduler.num_preemptions,
            "prefix_cache_queries": stats.queries,
            "prefix_cache_hits": stats.hits,
            "prefix_cache_hit_rate": stats.hit_rate,
            "prefix_cache_requests": stats.requests,
            "prefix_cache_tokens_saved": stats.tokens_saved,
            "prefix_cache_evictions": stats.evictions,
            "kv_connector": self.config.kv_transfer.kv_connector if self.config.kv_transfer else None,
            **{f"kv_connector_{k}": v for k, v in sorted(self.scheduler.kv_connector_stats.items())},
        }

    def reset_prefix_cache(self) -> bool:
        return self.scheduler.kv.reset_prefix_cache()

    def shutdown(self) -> None:
        if self.scheduler.connector is not None:
            self.scheduler.connector.shutdown()
        self.executor.shutdown()
