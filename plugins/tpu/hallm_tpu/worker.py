"""`TpuWorker`: the JAX worker the executor drives in place of the core's torch worker.

Same interface as `hallm.core.worker.Worker` (init_device, load_model, available_kv_cache_bytes,
bytes_per_block, init_kv_cache, execute): the core's SchedulerOutput in, the core's
ModelRunnerOutput out. Request state and the step's host arrays are the core's own
(`CachedRequestState`, `StepBuffers`: block tables, slot mapping, positions exactly as the core
defines them); they are padded to a compiled bucket and run through one jit-compiled program
(`hallm_tpu.model.forward`) that writes the KV cache in place (donated) and returns the logits
of the sampled rows. Sampling runs on the host through the core's Sampler, so greedy, seeded
and penalized sampling and logprobs have the cpu plugin's semantics.
"""

from __future__ import annotations

import functools
import logging
import time
from typing import Any

import numpy as np
import torch

from hallm.platforms import Platform
from hallm.worker_api import (
    CachedRequestState,
    EngineConfig,
    ModelRunnerOutput,
    RequestSamplingState,
    Sampler,
    SamplingMetadata,
    SchedulerOutput,
    StepBuffers,
    compute_prompt_logprobs,
    prompt_logprob_spans,
    step_seed,
)
from hallm_tpu.attention import ATTENTION_IMPLS, CHUNK_BLOCKS, DEFAULT_ATTENTION, padded_table_width
from hallm_tpu.buckets import Buckets

logger = logging.getLogger("hallm.tpu")

_TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
#: The KV pool of the JAX CPU-backend mode when the user sets no size (see
#: `available_kv_cache_bytes`).
CPU_BACKEND_KV_BYTES = 1 << 30


class TpuWorker:
    """One JAX device: its model, its KV cache, its compiled step programs."""

    def __init__(self, config: EngineConfig, platform: Platform, local_rank: int = 0) -> None:
        self.config = config
        self.platform = platform
        self.local_rank = local_rank
        self.block_size = config.cache.block_size
        self.max_model_len = config.model.max_model_len
        self.max_blocks_per_req = -(-self.max_model_len // self.block_size)
        self.table_width = padded_table_width(self.max_blocks_per_req)
        self.buckets = Buckets.for_limits(
            config.scheduler.max_num_batched_tokens, config.scheduler.max_num_seqs
        )
        self.attention_name = config.attention_backend or DEFAULT_ATTENTION
        self.requests: dict[str, CachedRequestState] = {}
        self.sampler = Sampler()
        self.host = torch.device("cpu")
        self.buffers = StepBuffers(
            config.scheduler.max_num_batched_tokens,
            config.scheduler.max_num_seqs,
            self.max_blocks_per_req,
            self.host,
        )
        self.model: Any = None
        self.kv_cache: Any = None
        self.num_slots = 0
        self.programs: dict[tuple[int, int], Any] = {}

    # ---- setup ------------------------------------------------------------------------------

    def init_device(self) -> None:
        import jax

        self.device = jax.local_devices()[self.local_rank]
        self.platform.manual_seed(self.config.model.seed)
        logger.info("tpu worker on %s", self.platform.device_name(self.local_rank))

    def load_model(self) -> None:
        """Build the hallm torch model on the host through the core's loader (safetensors, GGUF or
        dummy weights), convert its parameters once to device arrays, and keep the host copy of
        the output projection only (prompt logprobs are computed from it on the host)."""
        from hallm.platforms.registry import models as contributed_models
        from hallm.worker_api import LlamaForCausalLM, load_model
        from hallm_tpu.model import JaxLlama

        cfg = self.config.model
        torch_model = load_model(
            cfg.model,
            "cpu",
            _TORCH_DTYPES[cfg.dtype],
            load_format=cfg.load_format,
            hf_config=cfg.hf_config,
            seed=cfg.seed,
            extra_models=contributed_models(),
        ).model
        if not isinstance(torch_model, LlamaForCausalLM):
            raise TypeError(f"the tpu device runs the Llama family only, not {type(torch_model).__name__}")
        start = time.perf_counter()
        self.model = JaxLlama.from_torch(torch_model, cfg.hf_config, cfg.dtype, self.device)
        self.lm_head = torch_model.lm_head.weight.detach().float()  # [V, H], host
        self.vocab_size = self.model.dims.vocab_size
        logger.info("weights converted to JAX arrays in %.1f s", time.perf_counter() - start)

    def bytes_per_block(self) -> int:
        d = self.model.dims
        elem = 2 if d.dtype == "bfloat16" else 4
        return d.num_layers * 2 * self.block_size * d.num_kv_heads * d.head_size * elem

    def available_kv_cache_bytes(self) -> int:
        """budget = total * gpu_memory_utilization - memory in use with the weights loaded.

        A step's activations are not measured (XLA plans them per program): the utilization
        fraction leaves their room."""
        free, total = self.platform.memory_info(self.local_rank)
        budget = int(total * self.config.cache.gpu_memory_utilization) - (total - free)
        logger.info(
            "memory: total %.2f GiB, in use %.2f GiB -> KV budget %.2f GiB",
            total / 2**30,
            (total - free) / 2**30,
            budget / 2**30,
        )
        if self.device.platform == "cpu" and self.config.cache.kv_cache_memory_bytes is None:
            # JAX's CPU backend writes every page of the cache it allocates, in the host memory
            # every other process shares: the test mode takes a small pool unless told otherwise.
            budget = min(budget, CPU_BACKEND_KV_BYTES)
            logger.info(
                "JAX CPU backend: KV cache capped at %.2f GiB (--kv-cache-memory-bytes sets it)",
                budget / 2**30,
            )
        return max(0, budget)

    def init_kv_cache(self, num_blocks: int) -> None:
        """Allocate the cache [L, 2, num_blocks, block_size, Hkv, D] and compile every bucket."""
        import jax
        import jax.numpy as jnp

        d = self.model.dims
        shape = (d.num_layers, 2, num_blocks, self.block_size, d.num_kv_heads, d.head_size)
        dtype = jnp.bfloat16 if d.dtype == "bfloat16" else jnp.float32
        self.kv_cache = jax.device_put(jnp.zeros(shape, dtype), self.device)
        self.num_slots = num_blocks * self.block_size
        self._windows = jax.device_put(jnp.asarray(self.model.windows), self.device)
        self._compile_all()

    def _compile_all(self) -> None:
        import jax
        from tqdm.auto import tqdm

        from hallm_tpu.model import StepInputs, forward, register_step_inputs

        register_step_inputs()
        step = jax.jit(
            functools.partial(forward, dims=self.model.dims, attention=ATTENTION_IMPLS[self.attention_name]),
            donate_argnums=(1,),
        )
        shapes = self.buckets.shapes()
        start = time.perf_counter()
        for t, r in tqdm(shapes, desc="compiling step programs", unit="program", leave=False):
            i32 = jax.ShapeDtypeStruct
            inputs = StepInputs(
                input_ids=i32((t,), np.int32),
                positions=i32((t,), np.int32),
                slots=i32((t,), np.int32),
                token_req=i32((t,), np.int32),
                block_tables=i32((r, self.table_width), np.int32),
                num_chunks=i32((), np.int32),
                logits_rows=i32((r,), np.int32),
                rope_long=i32((t,), np.int32),
            )
            self.programs[(t, r)] = step.lower(
                self.model.params, self.kv_cache, self._windows, inputs
            ).compile()
        logger.info(
            "compiled %d step programs (tokens %s x requests %s, attention %s) in %.1f s",
            len(shapes),
            list(self.buckets.token),
            list(self.buckets.request),
            self.attention_name,
            time.perf_counter() - start,
        )

    # ---- one step ---------------------------------------------------------------------------

    def _update_states(self, step: SchedulerOutput) -> None:
        for req_id in step.finished_req_ids:
            self.requests.pop(req_id, None)
        for new in step.new_requests:
            tokens = np.zeros(self.max_model_len + 1, dtype=np.int64)
            all_ids = new.prompt_token_ids + new.output_token_ids
            tokens[: len(all_ids)] = all_ids
            params = new.sampling_params
            generator = torch.Generator(device=self.host) if params.seed is not None else None
            state = CachedRequestState(
                req_id=new.req_id,
                params=params,
                token_ids=tokens,
                num_tokens=len(all_ids),
                num_prompt_tokens=len(new.prompt_token_ids),
                block_table=np.zeros(self.max_blocks_per_req, dtype=np.int32),
                num_blocks=0,
                num_computed_tokens=new.num_computed_tokens,
                output_token_ids=list(new.output_token_ids),
                eos_token_ids=new.eos_token_ids,
                generator=generator,
            )
            state.sampling = RequestSamplingState(
                params=params,
                prompt_token_ids=state.token_ids[: state.num_prompt_tokens],
                output_token_ids=state.output_token_ids,
                generator=generator,
                eos_token_ids=new.eos_token_ids,
            )
            state.append_blocks(new.block_ids)
            self.requests[new.req_id] = state
        for cached in step.cached_requests:
            self.requests[cached.req_id].append_blocks(cached.new_block_ids)

    def execute(self, step: SchedulerOutput) -> ModelRunnerOutput:
        """Run one step to the end: the per-request loop copies each request's new tokens and
        block row into the host buffers; everything per token is vectorized numpy or on device."""
        self._update_states(step)
        output = ModelRunnerOutput(sampled_token_ids={})
        if step.is_empty:
            return output
        b = self.buffers
        states = [self.requests[r] for r in step.num_scheduled_tokens]
        num_reqs = len(states)
        offset = 0
        max_blocks = 1
        sample_rows: list[int] = []
        for i, state in enumerate(states):
            n = step.num_scheduled_tokens[state.req_id]
            c = state.num_computed_tokens
            b.input_ids[offset : offset + n] = state.token_ids[c : c + n]
            b.context_lens[i] = c
            b.num_prompt_tokens[i] = state.num_prompt_tokens
            b.block_tables[i, : state.num_blocks] = state.block_table[: state.num_blocks]
            max_blocks = max(max_blocks, state.num_blocks)
            offset += n
            b.query_start_loc[i + 1] = offset
            if c + n >= state.num_tokens:
                sample_rows.append(i)
        b.query_start_loc[0] = 0
        layout, _, _ = b.build(num_reqs, offset, self.block_size, max_blocks)
        logits, hidden = self._run(layout, sample_rows)
        self._prompt_logprobs(states, step, layout, hidden, output)
        if sample_rows:
            self._sample([states[i] for i in sample_rows], logits, output)
        for state in states:
            state.num_computed_tokens += step.num_scheduled_tokens[state.req_id]
        return output

    def _run(self, layout: Any, sample_rows: list[int]) -> tuple[np.ndarray, Any]:
        """Pad the layout to its bucket and run the step's program: (logits float32 [n, V] of
        the sampled rows, final hidden [T_bucket, H] still on the device)."""
        num_tokens, num_reqs = layout.num_tokens, layout.num_reqs
        t, r = self.buckets.pick(num_tokens, num_reqs)
        query_lens = np.diff(layout.query_start_loc)
        ids = np.zeros(t, np.int32)
        ids[:num_tokens] = self.buffers.input_ids[:num_tokens]
        positions = np.zeros(t, np.int32)
        positions[:num_tokens] = self.buffers.positions[:num_tokens]
        slots = np.full(t, self.num_slots, np.int32)  # past the cache: padding writes are dropped
        slots[:num_tokens] = layout.slot_mapping
        token_req = np.zeros(t, np.int32)
        token_req[:num_tokens] = np.repeat(np.arange(num_reqs, dtype=np.int32), query_lens)
        tables = np.zeros((r, self.table_width), np.int32)
        tables[:num_reqs, : layout.block_tables.shape[1]] = layout.block_tables
        rows = np.zeros(r, np.int32)
        rows[: len(sample_rows)] = layout.query_start_loc[1:][sample_rows] - 1
        num_chunks = np.int32(-(-int(layout.seq_lens.max()) // (CHUNK_BLOCKS * self.block_size)))

        from hallm_tpu.model import StepInputs

        inputs = StepInputs(
            ids,
            positions,
            slots,
            token_req,
            tables,
            num_chunks,
            rows,
            self._rope_long(t, positions, token_req),
        )
        logits, hidden, self.kv_cache = self.programs[(t, r)](
            self.model.params, self.kv_cache, self._windows, inputs
        )
        # A private copy: torch wants a writable array, and the sampler must not alias a JAX buffer.
        return np.array(np.asarray(logits)[: len(sample_rows)]), hidden

    def _rope_long(self, t: int, positions: np.ndarray, token_req: np.ndarray) -> np.ndarray:
        """int32 [t]: longrope's per-token choice, as the core's `longrope_use_long` makes it: long
        past the original context, or for every token of a request whose prompt is longer than it
        (HF computes such a prompt in one forward with the long factors)."""
        start = self.model.dims.long_rope_from
        if start is None:
            return np.zeros(t, np.int32)
        num_reqs = int(token_req.max()) + 1 if t else 0
        long_prompt = self.buffers.num_prompt_tokens[:num_reqs] > start
        return ((positions >= start) | long_prompt[token_req]).astype(np.int32)

    def _sample(
        self, states: list[CachedRequestState], logits: np.ndarray, output: ModelRunnerOutput
    ) -> None:
        for st in states:
            if st.generator is not None:
                st.generator.manual_seed(step_seed(st.params.seed or 0, st.num_output_tokens))
        meta = SamplingMetadata.build([st.sampling for st in states], self.vocab_size, self.host)
        result = self.sampler(torch.from_numpy(logits), meta)
        tokens = result.sampled_token_ids.tolist()
        lp = result.logprobs
        lp_host = (
            None if lp is None else (lp.token_ids.tolist(), lp.logprobs.tolist(), lp.sampled_rank.tolist())
        )
        for j, st in enumerate(states):
            st.token_ids[st.num_tokens] = tokens[j]
            st.num_tokens += 1
            st.output_token_ids.append(tokens[j])  # also the sampling state's list
            output.sampled_token_ids[st.req_id] = tokens[j]
            if lp_host is not None and st.params.logprobs is not None:
                k = st.params.logprobs + 1
                output.logprobs[st.req_id] = (lp_host[0][j][:k], lp_host[1][j][:k], lp_host[2][j])

    def _prompt_logprobs(
        self,
        states: list[CachedRequestState],
        step: SchedulerOutput,
        layout: Any,
        hidden: Any,
        output: ModelRunnerOutput,
    ) -> None:
        """Prompt logprobs of the positions computed this step, from the final hidden states
        (copied to the host only when some request asks) and the host output projection."""
        host_hidden: torch.Tensor | None = None
        for span in prompt_logprob_spans(states, step, layout):
            if not span.num:
                output.prompt_logprobs[span.req_id] = ([], [], [])
                continue
            if host_hidden is None:
                host_hidden = torch.from_numpy(np.array(hidden, dtype=np.float32))  # writable copy
            logits = host_hidden[span.start : span.start + span.num] @ self.lm_head.T
            lp = compute_prompt_logprobs(logits, torch.from_numpy(span.targets), span.k)
            output.prompt_logprobs[span.req_id] = (
                lp.token_ids.tolist(),
                lp.logprobs.tolist(),
                lp.sampled_rank.tolist(),
            )
