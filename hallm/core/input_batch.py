"""Per-request state the model runner keeps between steps, and the step's input buffers.

Buffers are allocated once at the largest step size and reused, so building a step copies a few
small arrays and launches no allocations; on a device other than the CPU the host arrays are
copied into persistent device tensors (which a captured graph can read).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import torch

from hallm.core.sampling_params import SamplingParams
from hallm.platforms import BatchLayout, LayoutTensors
from hallm.platforms.graphs import StepInputBuffers


@dataclasses.dataclass(eq=False)
class CachedRequestState:
    req_id: str
    params: SamplingParams
    token_ids: np.ndarray  # int64 [max_model_len]: prompt then outputs
    num_tokens: int  # known tokens plus pending ones (see `pending`)
    num_prompt_tokens: int
    block_table: np.ndarray  # int32 [max_blocks_per_req]
    num_blocks: int
    num_computed_tokens: int
    output_token_ids: list[int]  # known output tokens only
    eos_token_ids: frozenset[int]
    generator: torch.Generator | None
    # Sampled tokens still on the device, oldest first: (step handle, its row in the step's
    # sampled ids, position in token_ids). token_ids[position] is filled in when the step resolves.
    pending: list[tuple[Any, int, int]] = dataclasses.field(default_factory=list)
    # The request's sampling view, made once (its output_token_ids is this state's list).
    sampling: Any = None

    @property
    def num_output_tokens(self) -> int:
        """Output tokens sampled so far, pending ones included."""
        return len(self.output_token_ids) + len(self.pending)

    @property
    def needs_history(self) -> bool:
        """Its sampling metadata reads its output token ids on the host when the step is
        prepared (penalties, min_tokens). A grammar reads them too, but only when the sampler
        runs, after the step's forward is launched (`ModelRunner._sample`)."""
        return self.params.has_penalties or self.params.min_tokens > 0

    def append_blocks(self, block_ids: list[int]) -> None:
        n = len(block_ids)
        self.block_table[self.num_blocks : self.num_blocks + n] = block_ids
        self.num_blocks += n

    def add_pending(self, handle: Any, row: int) -> None:
        """A token sampled on the device, id not known yet: it takes the next position."""
        self.pending.append((handle, row, self.num_tokens))
        self.num_tokens += 1

    def resolve_pending(self, token_id: int) -> None:
        """The oldest pending token's id arrived."""
        _, _, position = self.pending.pop(0)
        self.token_ids[position] = token_id
        self.output_token_ids.append(token_id)


class StepBuffers:
    """Host (numpy) and device (torch) buffers for the largest step the config allows."""

    def __init__(
        self, max_num_tokens: int, max_num_reqs: int, max_blocks_per_req: int, device: torch.device
    ) -> None:
        self.device = device
        self.input_ids = np.zeros(max_num_tokens, dtype=np.int64)
        self.positions = np.zeros(max_num_tokens, dtype=np.int64)
        self.slot_mapping = np.zeros(max_num_tokens, dtype=np.int64)
        self.query_start_loc = np.zeros(max_num_reqs + 1, dtype=np.int32)
        self.seq_lens = np.zeros(max_num_reqs, dtype=np.int32)
        self.context_lens = np.zeros(max_num_reqs, dtype=np.int32)
        self.num_prompt_tokens = np.zeros(max_num_reqs, dtype=np.int32)
        self.block_tables = np.zeros((max_num_reqs, max_blocks_per_req), dtype=np.int32)
        # Persistent device copies (None on the CPU, where the host arrays are the tensors).
        self.device_inputs: StepInputBuffers | None = None
        if device.type != "cpu":

            def dev(a: np.ndarray) -> torch.Tensor:
                return torch.empty(a.shape, dtype=torch.from_numpy(a[:0]).dtype, device=device)

            self.device_inputs = StepInputBuffers(
                input_ids=dev(self.input_ids),
                positions=dev(self.positions),
                slot_mapping=dev(self.slot_mapping),
                query_start_loc=dev(self.query_start_loc),
                seq_lens=dev(self.seq_lens),
                context_lens=dev(self.context_lens),
                num_prompt_tokens=dev(self.num_prompt_tokens),
                block_tables=dev(self.block_tables),
            )

    def _to_device(self, host: np.ndarray, dev_buf: torch.Tensor | None, n: int) -> torch.Tensor:
        src = torch.from_numpy(host[:n])
        if dev_buf is None:
            return src  # CPU: the host array is the tensor (zero copy)
        dst = dev_buf[:n]
        dst.copy_(src, non_blocking=True)
        return dst

    def build(
        self, num_reqs: int, num_tokens: int, block_size: int, max_blocks: int
    ) -> tuple[BatchLayout, torch.Tensor, torch.Tensor]:
        """Make the step's layout and (input_ids, positions) device tensors from filled host arrays.

        Callers fill input_ids[:T], query_start_loc[:R+1], context_lens[:R], num_prompt_tokens[:R],
        block_tables[:R] first; positions, seq_lens and slot_mapping are derived here, vectorized.
        """
        qsl = self.query_start_loc[: num_reqs + 1]
        query_lens = np.diff(qsl)
        ctx = self.context_lens[:num_reqs]
        np.add(ctx, query_lens, out=self.seq_lens[:num_reqs])
        req_idx = np.repeat(np.arange(num_reqs), query_lens)
        # position of token t = context_len of its request + its offset in the request's chunk
        positions = self.positions[:num_tokens]
        np.subtract(np.arange(num_tokens), np.repeat(qsl[:-1] - ctx, query_lens), out=positions)
        block_idx = positions // block_size
        self.slot_mapping[:num_tokens] = (
            self.block_tables[req_idx, block_idx].astype(np.int64) * block_size + positions % block_size
        )
        d = self.device_inputs
        tensors = LayoutTensors(
            query_start_loc=self._to_device(
                self.query_start_loc, d.query_start_loc if d else None, num_reqs + 1
            ),
            seq_lens=self._to_device(self.seq_lens, d.seq_lens if d else None, num_reqs),
            context_lens=self._to_device(self.context_lens, d.context_lens if d else None, num_reqs),
            block_tables=self._to_device(self.block_tables, d.block_tables if d else None, num_reqs)[
                :, :max_blocks
            ],
            slot_mapping=self._to_device(self.slot_mapping, d.slot_mapping if d else None, num_tokens),
            num_prompt_tokens=self._to_device(
                self.num_prompt_tokens, d.num_prompt_tokens if d else None, num_reqs
            ),
        )
        layout = BatchLayout(
            num_reqs=num_reqs,
            num_tokens=num_tokens,
            num_prefill_reqs=int(np.count_nonzero(query_lens > 1)),
            max_query_len=int(query_lens.max()) if num_reqs else 0,
            max_seq_len=int(self.seq_lens[:num_reqs].max()) if num_reqs else 0,
            query_start_loc=qsl,
            seq_lens=self.seq_lens[:num_reqs],
            context_lens=ctx,
            block_tables=self.block_tables[:num_reqs, :max_blocks],
            slot_mapping=self.slot_mapping[:num_tokens],
            block_size=block_size,
            tensors=tensors,
            num_prompt_tokens=self.num_prompt_tokens[:num_reqs],
        )
        input_ids = self._to_device(self.input_ids, d.input_ids if d else None, num_tokens)
        pos = self._to_device(self.positions, d.positions if d else None, num_tokens)
        return layout, input_ids, pos
