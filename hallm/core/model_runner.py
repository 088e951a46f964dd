"""Runs one scheduled step on one device: inputs -> model -> logits -> sampled tokens.

Device-neutral: attention goes through the selected AttentionBackend, device work through the
Platform. Per step the runner does a loop over *requests* (to copy their new token ids and block
rows into persistent host buffers), never over tokens; positions and slot mappings are derived
with vectorized numpy; sampling runs on the device over the whole batch.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import torch

from hallm.core.attention_selector import select_attention_backend
from hallm.core.config import EngineConfig
from hallm.platforms.forward_context import ForwardContext, set_forward_context
from hallm.core.input_batch import CachedRequestState, StepBuffers
from hallm.core.layers.attention import Attention
from hallm.core.outputs import ModelRunnerOutput
from hallm.core.sampler import RequestSamplingState, Sampler, SamplingMetadata, compute_prompt_logprobs
from hallm.core.scheduler_output import SchedulerOutput
from hallm.platforms import AttentionBackend, AttentionSpec, Platform

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
        self.sampler = Sampler()
        # A platform's graph runner (see Platform.step_graphs): `can_replay(layout) -> bool` and
        # `replay(layout, input_ids, positions) -> hidden`; it reads this runner's buffers.
        self.graphs: Any = None
        self.buffers = StepBuffers(
            self.max_num_tokens,
            self.max_num_reqs,
            self.max_blocks_per_req,
            device,
            pin=platform.capabilities().pin_memory,
        )

    # ---- setup ------------------------------------------------------------------------------

    def load_model(self) -> None:
        from hallm.core.model_loader import load_model
        from hallm.platforms.registry import models as contributed_models

        cfg = self.config.model
        model = load_model(
            cfg.model,
            self.device,
            self.dtype,
            load_format=cfg.load_format,
            hf_config=cfg.hf_config,
            seed=cfg.seed,
            extra_models=contributed_models(),
        ).model
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

    def capture_graphs(self) -> None:
        """Ask the platform for a graph runner (after the real KV cache exists); None means eager."""
        if self.config.enforce_eager or not self.platform.capabilities().graph_capture:
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
        for i in range(num_reqs):
            b.block_tables[i, :per_req_blocks] = 1 + (np.arange(per_req_blocks) + i * per_req_blocks) % (
                num_blocks - 1
            )
        layout, input_ids, positions = b.build(num_reqs, num_tokens, self.block_size, per_req_blocks)
        hidden = self._forward(layout, input_ids, positions)
        self.model.compute_logits(hidden[-num_reqs:])
        self.platform.synchronize()
        self.kv_caches = []
        for layer in self.attn_layers:
            layer.kv_cache = None

    # ---- one step ---------------------------------------------------------------------------

    def _forward(self, layout: Any, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
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
            state.append_blocks(new.block_ids)
            self.requests[new.req_id] = state
        for cached in step.cached_requests:
            state = self.requests[cached.req_id]
            state.append_blocks(cached.new_block_ids)

    @torch.inference_mode()
    def execute(self, step: SchedulerOutput) -> ModelRunnerOutput:
        self._update_states(step)
        if step.is_empty:
            return ModelRunnerOutput(sampled_token_ids={})
        b = self.buffers
        req_ids = list(step.num_scheduled_tokens)
        num_reqs = len(req_ids)
        states = [self.requests[r] for r in req_ids]
        offset = 0
        max_blocks = 1
        sample_rows: list[int] = []  # batch rows whose step reaches the end of their known tokens
        for i, state in enumerate(states):
            n = step.num_scheduled_tokens[state.req_id]
            c = state.num_computed_tokens
            b.input_ids[offset : offset + n] = state.token_ids[c : c + n]
            b.context_lens[i] = c
            b.block_tables[i, : state.num_blocks] = state.block_table[: state.num_blocks]
            max_blocks = max(max_blocks, state.num_blocks)
            offset += n
            b.query_start_loc[i + 1] = offset
            if c + n >= state.num_tokens:
                sample_rows.append(i)
        b.query_start_loc[0] = 0
        layout, input_ids, positions = b.build(num_reqs, offset, self.block_size, max_blocks)
        if self.graphs is not None and self.graphs.can_replay(layout):
            hidden = self.graphs.replay(layout, input_ids, positions)
        else:
            hidden = self._forward(layout, input_ids, positions)

        out = ModelRunnerOutput(sampled_token_ids={})
        self._prompt_logprobs(states, step, layout, hidden, out)
        if sample_rows:
            self._sample(states, sample_rows, layout, hidden, out)
        for state in states:
            state.num_computed_tokens += step.num_scheduled_tokens[state.req_id]
        return out

    def _sample(
        self,
        states: list[CachedRequestState],
        rows: list[int],
        layout: Any,
        hidden: torch.Tensor,
        out: ModelRunnerOutput,
    ) -> None:
        last_idx = torch.from_numpy(layout.query_start_loc[1:][rows] - 1).to(hidden.device)
        logits = self.model.compute_logits(hidden.index_select(0, last_idx))
        sampling_states = []
        for i in rows:
            st = states[i]
            if st.generator is not None:
                st.generator.manual_seed(step_seed(st.params.seed or 0, len(st.output_token_ids)))
            sampling_states.append(
                RequestSamplingState(
                    params=st.params,
                    prompt_token_ids=st.token_ids[: st.num_prompt_tokens],
                    output_token_ids=st.output_token_ids,
                    generator=st.generator,
                    eos_token_ids=st.eos_token_ids,
                )
            )
        meta = SamplingMetadata.build(sampling_states, self.vocab_size, logits.device)
        result = self.sampler(logits, meta)
        tokens = result.sampled_token_ids.tolist()
        lp = result.logprobs
        if lp is not None:
            lp_ids, lp_vals, lp_ranks = lp.token_ids.tolist(), lp.logprobs.tolist(), lp.sampled_rank.tolist()
        for j, i in enumerate(rows):
            st = states[i]
            st.append_token(tokens[j])
            out.sampled_token_ids[st.req_id] = tokens[j]
            if lp is not None and st.params.logprobs is not None:
                k = st.params.logprobs + 1
                out.logprobs[st.req_id] = (lp_ids[j][:k], lp_vals[j][:k], lp_ranks[j])

    def _prompt_logprobs(
        self,
        states: list[CachedRequestState],
        step: SchedulerOutput,
        layout: Any,
        hidden: torch.Tensor,
        out: ModelRunnerOutput,
    ) -> None:
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
                out.prompt_logprobs[st.req_id] = ([], [], [])
                continue
            logits = self.model.compute_logits(hidden[start : start + (end - c)])
            targets = torch.from_numpy(st.token_ids[c + 1 : end + 1]).to(hidden.device)
            lp = compute_prompt_logprobs(logits, targets, k)
            out.prompt_logprobs[st.req_id] = (
                lp.token_ids.tolist(),
                lp.logprobs.tolist(),
                lp.sampled_rank.tolist(),
            )
