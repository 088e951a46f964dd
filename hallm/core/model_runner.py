"""Runs one scheduled step on one device: inputs -> model -> logits -> sampled tokens.

Device-neutral: attention goes through the selected AttentionBackend, device work through the
Platform. Per step the runner does a loop over *requests* (to copy their new token ids and block
rows into persistent host buffers), never over tokens; positions and slot mappings are derived
with vectorized numpy; sampling runs on the device over the whole batch.

`execute_async` launches a step without waiting for it: the sampled ids (and logprobs) are copied
to the host behind the step, and the returned `StepHandle.get()` waits for that copy alone. The
engine's async scheduling launches step N+1 before it calls step N's `get()`; a token of step N
that step N+1 must read is taken from step N's sampled ids on the device. `execute` is launch then
`get()` (sync scheduling, and the only mode on the CPU by default).

With a KV connector (its worker side), a step starts its loads before the forward and, after it,
waits for them, saves what the step asks to save and reports the results in its output. A
request's load step computes nothing for it (see Scheduler), so loads overlap the forward of the
other requests and no layer waits for them.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import torch

from hallm.core.attention_selector import select_attention_backend
from hallm.core.config import EngineConfig
from hallm.core.input_batch import CachedRequestState, StepBuffers
from hallm.core.kv_connectors.worker_side import finish_kv_step, start_worker_connector
from hallm.core.layers.attention import Attention
from hallm.core.outputs import ModelRunnerOutput
from hallm.core.prompt_logprobs import add_prompt_logprobs
from hallm.core.sampler import RequestSamplingState, Sampler, SamplingMetadata
from hallm.core.scheduler_output import SchedulerOutput
from hallm.core.step_handle import InFlightSteps, StepHandle
from hallm.platforms import AttentionBackend, AttentionSpec, KVConnector, Platform
from hallm.platforms.forward_context import ForwardContext, set_forward_context
from hallm.platforms.graphs import StepGraphRunner, StepInputBuffers

logger = logging.getLogger("hallm.runner")

_TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def torch_dtype(name: str) -> torch.dtype:
    return _TORCH_DTYPES[name]


def step_seed(seed: int, num_output_tokens: int) -> int:
    """A seeded request's generator state for its k-th token: a pure function of (seed, k), so its
    tokens do not depend on the batch it runs in, nor on preemption."""
    return (seed * 0x9E3779B97F4A7C15 + num_output_tokens * 0xBF58476D1CE4E5B9) & ((1 << 63) - 1)


class ModelRunner:
    def __init__(self, config: EngineConfig, platform: Platform, device: torch.device) -> None:
        self.config = config
        self.platform = platform
        self.device = device
        self.dtype = torch_dtype(config.model.dtype)
        self.block_size = config.cache.block_size
        self.max_model_len = config.model.max_model_len
        self.max_num_tokens = config.scheduler.max_num_batched_tokens
        self.max_num_reqs = config.scheduler.max_num_seqs
        self.max_blocks_per_req = -(-self.max_model_len // self.block_size)
        self.requests: dict[str, CachedRequestState] = {}
        self.model: Any = None
        self.attn_layers: list[Attention] = []
        self.backends: list[AttentionBackend] = []
        self.kv_caches: list[torch.Tensor] = []
        self.kv_connector: KVConnector | None = None
        # Pinned staging only where it makes the copy to the device asynchronous.
        self.sampler = Sampler(
            pin_memory=device.type != "cpu" and platform.capabilities().pinned_host_memory,
            temperature_sample=platform.op_table().temperature_sample,
        )
        self.in_flight = InFlightSteps(device, platform)  # launched steps not yet resolved
        self._meta_cache: tuple[list[CachedRequestState], SamplingMetadata] | None = None
        # Which request's block-table row each batch row of the host buffer holds, and how many
        # of its blocks: a request that keeps its row copies only its new blocks.
        self._row_state: list[CachedRequestState | None] = [None] * self.max_num_reqs
        self._row_blocks: list[int] = [0] * self.max_num_reqs
        # A platform's graph runner (hallm.platforms.graphs): it reads `inputs` and calls `forward`.
        self.graphs: StepGraphRunner | None = None
        self.model_graph_safe = True  # the loaded model's `supports_step_graphs`
        self.buffers = StepBuffers(self.max_num_tokens, self.max_num_reqs, self.max_blocks_per_req, device)
        self.inputs: StepInputBuffers | None = self.buffers.device_inputs

    # ---- setup ------------------------------------------------------------------------------

    def load_model(self) -> None:
        from hallm.core.model_loader import load_model
        from hallm.platforms.registry import models as contributed_models

        cfg = self.config.model
        model: Any = load_model(
            cfg.model,
            self.device,
            self.dtype,
            load_format=cfg.load_format,
            hf_config=cfg.hf_config,
            seed=cfg.seed,
            extra_models=contributed_models(),
            ops=self.platform.op_table(),
        ).model
        self.model_graph_safe = bool(getattr(model, "supports_step_graphs", True))
        self.vocab_size = int(self.config.model.hf_config.vocab_size)
        self.attn_layers = list(model.attention_layers())
        self.backends = []
        for layer in self.attn_layers:
            spec = AttentionSpec(
                num_heads=layer.num_heads,
                num_kv_heads=layer.num_kv_heads,
                head_size=layer.head_size,
                scale=layer.scale,
                dtype=self.config.model.dtype,
                kv_cache_dtype=self.config.cache.kv_cache_dtype,
                block_size=self.block_size,
                sliding_window=layer.sliding_window,
                logits_soft_cap=layer.logits_soft_cap,
                sinks=layer.sinks,
            )
            backend_cls = select_attention_backend(self.platform, spec, self.config.attention_backend)
            self.backends.append(backend_cls(spec))
        if self.backends:
            logger.info("attention backend: %s", type(self.backends[0]).name)
        self.model = self.platform.compile_model(model, self.config)

    def kv_cache_shapes(self, num_blocks: int) -> list[tuple[int, ...]]:
        return [
            type(b).kv_cache_shape(num_blocks, self.block_size, b.spec.num_kv_heads, b.spec.head_size)
            for b in self.backends
        ]

    def kv_cache_dtype(self) -> torch.dtype:
        spec = self.backends[0].spec
        return torch_dtype(spec.cache_dtype)

    def bytes_per_block(self) -> int:
        elem = torch.empty((), dtype=self.kv_cache_dtype()).element_size()
        return sum(int(np.prod(s)) for s in self.kv_cache_shapes(1)) * elem

    def init_kv_cache(self, num_blocks: int) -> None:
        dtype = self.kv_cache_dtype()
        # torch.empty: pages of an unused block are never touched (matters on the host).
        self.kv_caches = [
            torch.empty(s, dtype=dtype, device=self.device) for s in self.kv_cache_shapes(num_blocks)
        ]
        for layer, backend, cache in zip(self.attn_layers, self.backends, self.kv_caches, strict=True):
            layer.bind(backend, cache)

    def start_kv_connector(self) -> None:
        """Build the connector's worker side and hand it the real KV cache (once, after
        `init_kv_cache`; the profiling run's throwaway cache never reaches it)."""
        self.kv_connector = start_worker_connector(self.config, self.platform, self.kv_cache_by_layer())

    def stop_kv_connector(self) -> None:
        """Release the worker side's threads, sockets and host buffers."""
        if self.kv_connector is not None:
            self.kv_connector.shutdown()
            self.kv_connector = None

    def kv_cache_by_layer(self) -> dict[str, torch.Tensor]:
        """Every attention layer's KV-cache tensor by name ("layers.{i}.attn"), layer order."""
        return {
            f"layers.{layer.layer_idx}.attn": cache
            for layer, cache in zip(self.attn_layers, self.kv_caches, strict=True)
        }

    def capture_graphs(self) -> None:
        """Ask the platform for a graph runner (after the real KV cache exists); None means eager."""
        if self.config.enforce_eager or not self.platform.capabilities().graph_capture:
            self.graphs = None
            return
        if not self.model_graph_safe:
            logger.info("step graphs off: %s reads device values on the host", type(self.model).__name__)
            self.graphs = None
            return
        self.graphs = self.platform.step_graphs(self)

    @torch.inference_mode()
    def profile_run(self) -> None:
        """Run the largest step the config allows, on a throwaway cache, to measure peak memory."""
        num_tokens = min(self.max_num_tokens, self.max_model_len * self.max_num_reqs)
        # Enough requests that none is longer than max_model_len (and its block-table row).
        num_reqs = max(1, min(self.max_num_reqs, -(-num_tokens // max(1, self.max_model_len))))
        query_lens = np.full(num_reqs, num_tokens // num_reqs)
        query_lens[: num_tokens % num_reqs] += 1
        per_req_blocks = -(-int(query_lens.max()) // self.block_size)
        num_blocks = num_reqs * per_req_blocks + 1
        self.init_kv_cache(num_blocks)
        b = self.buffers
        b.input_ids[:num_tokens] = 0
        b.query_start_loc[0] = 0
        b.query_start_loc[1 : num_reqs + 1] = np.cumsum(query_lens)
        b.context_lens[:num_reqs] = 0
        b.num_prompt_tokens[:num_reqs] = query_lens
        for i in range(num_reqs):
            b.block_tables[i, :per_req_blocks] = 1 + (np.arange(per_req_blocks) + i * per_req_blocks) % (
                num_blocks - 1
            )
        layout, input_ids, positions = b.build(num_reqs, num_tokens, self.block_size, per_req_blocks)
        self._row_state = [None] * self.max_num_reqs  # the rows written here belong to no request
        hidden = self.forward(layout, input_ids, positions)
        self.model.compute_logits(hidden[-num_reqs:])
        self.platform.synchronize()
        self.kv_caches = []
        for layer in self.attn_layers:
            layer.kv_cache = None

    # ---- one step ---------------------------------------------------------------------------

    def forward(self, layout: Any, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """The model forward of one step -> hidden [num_tokens, hidden] (see StepGraphTarget)."""
        metadata: dict[type, Any] = {}
        for backend in self.backends:
            cls = type(backend)
            if cls not in metadata:
                metadata[cls] = cls.build_metadata(layout)
        with set_forward_context(ForwardContext(layout, metadata)):
            return self.model(input_ids, positions)

    def _update_states(self, step: SchedulerOutput) -> None:
        for req_id in step.finished_req_ids:
            self.requests.pop(req_id, None)
        for new in step.new_requests:
            tokens = np.zeros(self.max_model_len + 1, dtype=np.int64)
            all_ids = new.prompt_token_ids + new.output_token_ids
            tokens[: len(all_ids)] = all_ids
            table = np.zeros(self.max_blocks_per_req, dtype=np.int32)
            params = new.sampling_params
            generator = None
            if params.seed is not None:
                generator = torch.Generator(device=self.device)
            state = CachedRequestState(
                req_id=new.req_id,
                params=params,
                token_ids=tokens,
                num_tokens=len(all_ids),
                num_prompt_tokens=len(new.prompt_token_ids),
                block_table=table,
                num_blocks=0,
                num_computed_tokens=new.num_computed_tokens,
                output_token_ids=list(new.output_token_ids),
                eos_token_ids=new.eos_token_ids,
                generator=generator,
            )
            state.sampling = RequestSamplingState(
                params=params,
                prompt_token_ids=state.token_ids[: state.num_prompt_tokens],  # type: ignore[arg-type]
                output_token_ids=state.output_token_ids,
                generator=generator,
                eos_token_ids=new.eos_token_ids,
            )
            state.append_blocks(new.block_ids)
            self.requests[new.req_id] = state
        for cached in step.cached_requests:
            state = self.requests[cached.req_id]
            state.append_blocks(cached.new_block_ids)

    @torch.inference_mode()
    def execute(self, step: SchedulerOutput) -> ModelRunnerOutput:
        """Run one step and wait for its results."""
        return self.execute_async(step).get()

    @torch.inference_mode()
    def execute_async(self, step: SchedulerOutput) -> StepHandle:
        """Launch one step; its results come from the returned handle's `get()`.

        Nothing here waits for the device: sampled ids (and logprobs) are copied to the host
        behind the step, and a later step may be launched before this one's `get()`. A request
        whose newest token is still pending (sampled by the previous, unresolved step) gets it
        as input straight from that step's sampled ids on the device. Steps resolve in order.
        """
        self._update_states(step)
        # Steps without connector instructions (engine warm-up) leave the connector alone.
        connector = self.kv_connector if step.kv_connector_meta is not None else None
        if connector is not None:
            connector.start_load(step.kv_connector_meta)
        if step.total_num_scheduled_tokens == 0:
            output = ModelRunnerOutput(sampled_token_ids={})
            if connector is not None:
                finish_kv_step(connector, self.kv_cache_by_layer(), step, None, output)
            return StepHandle.done(output)
        b = self.buffers
        req_ids = list(step.num_scheduled_tokens)
        num_reqs = len(req_ids)
        states = [self.requests[r] for r in req_ids]
        if self.in_flight:
            # Penalties and min_tokens read output ids on the host: wait for them. Otherwise
            # only the newest step may stay unresolved (its ids are read on the device; a
            # grammar waits for them in `_sample`).
            if any(st.pending and st.needs_history for st in states):
                self.in_flight.resolve_all()
            else:
                self.in_flight.resolve_all_but_newest()
        prev = self.in_flight.newest()
        fill_dst: list[int] = []  # input positions whose token is pending in `prev`
        fill_src: list[int] = []  # ... and its row in prev's sampled ids
        offset = 0
        max_blocks = 1
        sample_rows: list[int] = []  # batch rows whose step reaches the end of their known tokens
        row_state, row_blocks = self._row_state, self._row_blocks
        for i, state in enumerate(states):
            n = step.num_scheduled_tokens[state.req_id]
            c = state.num_computed_tokens
            b.input_ids[offset : offset + n] = state.token_ids[c : c + n]
            for _, row, position in state.pending:
                if c <= position < c + n:
                    fill_dst.append(offset + position - c)
                    fill_src.append(row)
            b.context_lens[i] = c
            b.num_prompt_tokens[i] = state.num_prompt_tokens
            nb = state.num_blocks
            if row_state[i] is not state:
                b.block_tables[i, :nb] = state.block_table[:nb]
                row_state[i] = state
                row_blocks[i] = nb
            elif row_blocks[i] != nb:  # the same request in the same row: copy its new blocks
                b.block_tables[i, row_blocks[i] : nb] = state.block_table[row_blocks[i] : nb]
                row_blocks[i] = nb
            max_blocks = max(max_blocks, nb)
            offset += n
            b.query_start_loc[i + 1] = offset
            if c + n >= state.num_tokens:
                sample_rows.append(i)
        b.query_start_loc[0] = 0
        layout, input_ids, positions = b.build(num_reqs, offset, self.block_size, max_blocks)
        if fill_dst:
            assert prev is not None and prev.sampled is not None
            src = prev.sampled
            if fill_src != list(range(len(fill_src))) or len(fill_src) != src.numel():
                src = src.index_select(0, self._to_device_long(fill_src))
            if fill_dst == list(range(len(fill_dst))):
                input_ids[: len(fill_dst)].copy_(src)
            else:
                input_ids.index_copy_(0, self._to_device_long(fill_dst), src)
        if self.graphs is not None and self.graphs.can_replay(layout):
            hidden = self.graphs.replay(layout, input_ids, positions)
        else:
            hidden = self.forward(layout, input_ids, positions)

        handle = StepHandle(self.in_flight)
        if connector is not None:
            finish_kv_step(connector, self.kv_cache_by_layer(), step, layout, handle.output)
        add_prompt_logprobs(self.model, states, step, layout, hidden, handle)
        if sample_rows:
            self._sample(states, sample_rows, layout, hidden, handle)
        for state in states:
            state.num_computed_tokens += step.num_scheduled_tokens[state.req_id]
        self.in_flight.launched(handle)
        return handle

    def _to_device_long(self, values: list[int]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.long).to(self.device, non_blocking=True)

    def _sample_metadata(self, rows: list[CachedRequestState]) -> SamplingMetadata:
        """SamplingMetadata for these rows; reused while the rows are the same requests and none
        has step-dependent inputs (penalties count output tokens, min_tokens masks by count)."""
        cache = self._meta_cache
        if (
            cache is not None
            and len(cache[0]) == len(rows)
            and all(a is b for a, b in zip(cache[0], rows, strict=True))
        ):
            return cache[1]
        meta = SamplingMetadata.build([st.sampling for st in rows], self.vocab_size, self.device)
        static = all(
            not st.params.has_penalties and st.num_output_tokens >= st.params.min_tokens for st in rows
        )
        self._meta_cache = (rows, meta) if static else None
        return meta

    def _sample(
        self,
        states: list[CachedRequestState],
        rows: list[int],
        layout: Any,
        hidden: torch.Tensor,
        handle: StepHandle,
    ) -> None:
        if len(rows) == layout.num_tokens:  # every token is a sampled row's last: no gather
            last = hidden
        else:
            idx = layout.query_start_loc[1:][rows] - 1
            last = hidden.index_select(0, torch.from_numpy(idx).to(hidden.device, non_blocking=True))
        logits = self.model.compute_logits(last)
        row_states = [states[i] for i in rows]
        for st in row_states:
            if st.generator is not None:
                st.generator.manual_seed(step_seed(st.params.seed or 0, st.num_output_tokens))
        meta = self._sample_metadata(row_states)
        if self.in_flight and any(
            st.pending and st.params.structured_outputs is not None for st in row_states
        ):
            # A grammar's mask follows every token sampled so far: wait for the previous step's
            # here, with this step's forward already queued behind it on the device.
            self.in_flight.resolve_all()
        result = self.sampler(logits, meta)
        sampled = result.sampled_token_ids
        handle.sampled = sampled
        handle.sampled_slot = handle.add_host(sampled)
        lp = result.logprobs
        lp_slot = None
        if lp is not None:
            lp_slot = handle.add_host(lp.token_ids, lp.logprobs, lp.sampled_rank)
        for j, st in enumerate(row_states):
            st.add_pending(handle, j)
        handle.sample_states = row_states
        handle.lp_slot = lp_slot
