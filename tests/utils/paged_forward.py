"""Run a hallm model step by step over a paged KV cache, the way the model runner does, minus
the scheduler: for tests that compare a model with HF transformers.

`PagedRunner` binds every attention layer of a model to a backend and a NaN-poisoned paged
cache, hands out blocks in shuffled order (block 0 is the never-assigned null block, and
block-table padding points at it), builds each step's `BatchLayout` from per-sequence chunks
(prefill, chunked prefill, decode, several sequences at once) and runs
`forward` + `compute_logits` under `set_forward_context`.
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Hashable, Sequence
from typing import Any

import numpy as np
import torch

from hallm.platforms import AttentionBackend, AttentionSpec, BatchLayout, LayoutTensors
from hallm.platforms.forward_context import ForwardContext, set_forward_context


def default_backend_cls() -> type[AttentionBackend]:
    """The CPU plugin's reference backend when installed, else a minimal one on hallm.ops.reference."""
    try:
        from hallm_cpu.attention import CpuReferenceAttention
    except ImportError:
        return _ReferenceBackend
    return CpuReferenceAttention


class _ReferenceBackend(AttentionBackend):
    name = "test_reference"
    dtypes = frozenset({"float32", "bfloat16", "float16"})
    features = frozenset({"sliding_window", "soft_cap"})

    def forward(self, query, key, value, kv_cache, metadata, out):  # type: ignore[no-untyped-def]
        from hallm.ops.reference import paged_attention, write_kv

        t = metadata.tensors
        write_kv(key, value, kv_cache, t.slot_mapping)
        return paged_attention(
            query,
            kv_cache,
            t.query_start_loc,
            t.seq_lens,
            t.context_lens,
            t.block_tables,
            self.spec.scale,
            self.spec.num_kv_heads,
            sliding_window=self.spec.sliding_window,
            logits_soft_cap=self.spec.logits_soft_cap,
            out=out,
        )


_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


@dataclasses.dataclass
class _Seq:
    blocks: list[int]
    num_computed: int = 0


class PagedRunner:
    """Paged KV caches for `model`'s attention layers and a step function over sequences."""

    def __init__(
        self,
        model: Any,
        *,
        num_blocks: int = 64,
        block_size: int = 4,
        seed: int = 0,
        poison: float = float("nan"),
        backend_cls: type[AttentionBackend] | None = None,
    ) -> None:
        self.model = model
        self.block_size = block_size
        self.backend_cls = backend_cls or default_backend_cls()
        param = next(model.parameters())
        self.device, dtype = param.device, param.dtype
        self.free = list(range(1, num_blocks))  # block 0: the null block, never assigned
        random.Random(seed).shuffle(self.free)
        self.seqs: dict[Hashable, _Seq] = {}
        layers = model.attention_layers()
        if not layers:
            raise ValueError(f"{type(model).__name__}.attention_layers() returned no layers")
        for layer in layers:
            spec = AttentionSpec(
                num_heads=layer.num_heads,
                num_kv_heads=layer.num_kv_heads,
                head_size=layer.head_size,
                scale=layer.scale,
                dtype=_DTYPE_NAMES[dtype],
                block_size=block_size,
                sliding_window=layer.sliding_window,
                logits_soft_cap=layer.logits_soft_cap,
            )
            reasons = self.backend_cls.validate(spec)
            if reasons:
                raise ValueError(f"{self.backend_cls.name} cannot serve layer {layer.layer_idx}: {reasons}")
            shape = self.backend_cls.kv_cache_shape(
                num_blocks, block_size, layer.num_kv_heads, layer.head_size
            )
            cache = torch.full(shape, poison, dtype=dtype, device=self.device)
            layer.bind(self.backend_cls(spec), cache)

    def free_seq(self, seq_id: Hashable) -> None:
        """Return a sequence's blocks to the pool (in a scrambled order, for later reuse)."""
        seq = self.seqs.pop(seq_id)
        self.free.extend(reversed(seq.blocks))

    @torch.no_grad()
    def step(self, chunks: Sequence[tuple[Hashable, Sequence[int]]]) -> list[torch.Tensor]:
        """Run one step: for each (seq_id, new token ids), those tokens after the sequence's
        cached ones. Returns float32 logits [len(tokens), vocab] per chunk, in order."""
        bs = self.block_size
        ids: list[int] = []
        positions: list[np.ndarray] = []
        slots: list[np.ndarray] = []
        qsl, seq_lens, ctx_lens, tables = [0], [], [], []
        for seq_id, tokens in chunks:
            if not tokens:
                raise ValueError("every chunk needs at least one token")
            seq = self.seqs.setdefault(seq_id, _Seq(blocks=[]))
            ctx, n = seq.num_computed, len(tokens)
            while len(seq.blocks) * bs < ctx + n:
                if not self.free:
                    raise RuntimeError("out of KV blocks; raise num_blocks")
                seq.blocks.append(self.free.pop())
            pos = np.arange(ctx, ctx + n)
            table = np.asarray(seq.blocks, dtype=np.int64)
            ids.extend(int(t) for t in tokens)
            positions.append(pos)
            slots.append(table[pos // bs] * bs + pos % bs)
            qsl.append(qsl[-1] + n)
            seq_lens.append(ctx + n)
            ctx_lens.append(ctx)
            tables.append(seq.blocks)
            seq.num_computed += n
        max_blocks = max(len(t) for t in tables)
        block_tables = np.zeros((len(tables), max_blocks), dtype=np.int32)  # padding -> null block 0
        for i, t in enumerate(tables):
            block_tables[i, : len(t)] = t
        layout = BatchLayout(
            num_reqs=len(chunks),
            num_tokens=len(ids),
            num_prefill_reqs=sum(1 for _, t in chunks if len(t) > 1),
            max_query_len=max(len(t) for _, t in chunks),
            max_seq_len=max(seq_lens),
            query_start_loc=np.asarray(qsl, dtype=np.int32),
            seq_lens=np.asarray(seq_lens, dtype=np.int32),
            context_lens=np.asarray(ctx_lens, dtype=np.int32),
            block_tables=block_tables,
            slot_mapping=np.concatenate(slots).astype(np.int64),
            block_size=bs,
        )
        dev = self.device
        layout.tensors = LayoutTensors(
            query_start_loc=torch.from_numpy(layout.query_start_loc).to(dev),
            seq_lens=torch.from_numpy(layout.seq_lens).to(dev),
            context_lens=torch.from_numpy(layout.context_lens).to(dev),
            block_tables=torch.from_numpy(layout.block_tables).to(dev),
            slot_mapping=torch.from_numpy(layout.slot_mapping).to(dev),
        )
        metadata = {self.backend_cls: self.backend_cls.build_metadata(layout)}
        input_ids = torch.tensor(ids, dtype=torch.long, device=dev)
        pos_t = torch.from_numpy(np.concatenate(positions)).to(dev)
        with set_forward_context(ForwardContext(layout=layout, metadata=metadata)):
            hidden = self.model(input_ids, pos_t)
        logits = self.model.compute_logits(hidden)
        return list(logits.split([len(t) for _, t in chunks]))

    def greedy(self, seq_id: Hashable, prompt: Sequence[int], max_new_tokens: int) -> list[int]:
        """Prefill `prompt`, then decode greedily; returns the new token ids."""
        logits = self.step([(seq_id, prompt)])[0]
        out = [int(logits[-1].argmax())]
        for _ in range(max_new_tokens - 1):
            out.append(int(self.step([(seq_id, [out[-1]])])[0][-1].argmax()))
        return out


@torch.no_grad()
def hf_logits(hf_model: Any, token_ids: Sequence[int]) -> torch.Tensor:
    """HF transformers' float32 logits [T, vocab] for one unpadded sequence."""
    device = next(hf_model.parameters()).device
    ids = torch.tensor([list(token_ids)], dtype=torch.long, device=device)
    return hf_model(input_ids=ids, use_cache=False).logits[0].float()


@torch.no_grad()
def hf_greedy(hf_model: Any, prompt: Sequence[int], max_new_tokens: int) -> list[int]:
    """HF transformers' greedy continuation (new tokens only; argmax every step, EOS included)."""
    device = next(hf_model.parameters()).device
    ids = torch.tensor([list(prompt)], dtype=torch.long, device=device)
    out = hf_model(input_ids=ids, use_cache=True)
    new = [int(out.logits[0, -1].argmax())]
    for _ in range(max_new_tokens - 1):
        step = torch.tensor([[new[-1]]], dtype=torch.long, device=device)
        out = hf_model(input_ids=step, past_key_values=out.past_key_values, use_cache=True)
        new.append(int(out.logits[0, -1].argmax()))
    return new
