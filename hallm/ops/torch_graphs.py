"""Device graphs of decode steps, captured for padded batch sizes, through `torch.cuda`'s graph API.

One runner serves the platforms whose torch build speaks that API: CUDA graphs on a CUDA build
and HIP graphs on a ROCm build (where `torch.cuda` is HIP). `capture_decode_graphs(target)` is
what their `step_graphs` returns: after the KV cache
exists, it captures one graph per batch size in `capture_sizes` (largest first, sharing one
memory pool). Each graph runs the model runner's forward of a decode step (every request has one
new token) reading only its persistent device inputs (`StepGraphTarget.inputs`), so a replay
picks up whatever the runner copied there for the step.

A step of n decode requests replays the smallest captured size B >= n. Rows n..B-1 are padding
requests: one token each, slot -1 (its key/value is not written), sequence length 1 read from
block 0 (the null block, never handed out), token id 0 at position 0. Their outputs are garbage
that nothing reads: every operation of the model is row-wise except attention, which is
per request.

Prefill and mixed steps, and decode steps larger than the largest size, run eagerly. Only
backends that declare `graph_safe = True` (no host reads in forward) are captured; otherwise the
engine stays eager and says why in the log. A capture that fails is an error that names the
cause (and `--enforce-eager`, which runs without graphs).
"""

from __future__ import annotations

import logging
import time
from typing import Any

import numpy as np
import torch

from hallm.platforms import BatchLayout, LayoutTensors
from hallm.platforms.graphs import StepGraphTarget

logger = logging.getLogger("hallm.ops.graphs")

#: Largest decode batch captured (larger steps run eagerly).
MAX_CAPTURE_SIZE = 512


def capture_sizes(max_reqs: int) -> list[int]:
    """1, 2, 4, 8, then every 16 up to 256, every 32 up to 512; capped at max_reqs (included)."""
    sizes = [1, 2, 4, 8, *range(16, 257, 16), *range(288, MAX_CAPTURE_SIZE + 1, 32)]
    cap = min(max_reqs, MAX_CAPTURE_SIZE)
    out = [s for s in sizes if s <= cap]
    if cap not in out:
        out.append(cap)
    return out


def capture_decode_graphs(target: StepGraphTarget, sizes: list[int] | None = None) -> DecodeGraphs | None:
    """Capture decode graphs of `target`, or return None (eager) with the reason logged.

    Raises RuntimeError naming the cause when a capture fails."""
    unsafe = sorted({type(b).name for b in target.backends if not type(b).graph_safe})
    if unsafe:
        logger.info("decode graphs off: attention backend(s) %s are not graph-safe", unsafe)
        return None
    if target.inputs is None:
        logger.info("decode graphs off: the model runner has no device input buffers")
        return None
    max_reqs = min(target.max_num_reqs, target.max_num_tokens)
    try:
        return DecodeGraphs(target, sizes or capture_sizes(max_reqs))
    except Exception as exc:
        raise RuntimeError(
            f"capturing the decode graphs failed: {type(exc).__name__}: {exc}. "
            "Run with --enforce-eager to decode without graphs, and report this error."
        ) from exc


class DecodeGraphs:
    """The graph runner the model runner calls: `can_replay(layout)`, `replay(layout, ids, pos)`."""

    def __init__(self, target: StepGraphTarget, sizes: list[int]) -> None:
        assert target.inputs is not None  # checked by capture_decode_graphs
        self.target = target
        self.buffers = target.inputs
        self.sizes = sorted(set(sizes))
        self.max_size = self.sizes[-1]
        # bucket[n]: the smallest captured size >= n
        self.bucket = np.zeros(self.max_size + 1, dtype=np.int64)
        j = 0
        for n in range(1, self.max_size + 1):
            while self.sizes[j] < n:
                j += 1
            self.bucket[n] = self.sizes[j]
        device = self.buffers.input_ids.device
        self.arange = torch.arange(self.max_size + 1, dtype=torch.int32, device=device)
        self.graphs: dict[int, Any] = {}  # size -> torch.cuda.CUDAGraph (anything with replay())
        self.outputs: dict[int, torch.Tensor] = {}
        start = time.perf_counter()
        with torch.inference_mode():
            self._pad(0, self.max_size)
            pool = self._new_pool()
            for size in reversed(self.sizes):  # largest first: smaller graphs reuse its memory
                self._capture(size, pool)
        self._synchronize()
        logger.info(
            "captured %d decode graphs (batch sizes %s) in %.1f s",
            len(self.sizes),
            self.sizes,
            time.perf_counter() - start,
        )

    def _layout(self, size: int) -> tuple[BatchLayout, torch.Tensor, torch.Tensor]:
        b = self.buffers
        tensors = LayoutTensors(
            query_start_loc=b.query_start_loc[: size + 1],
            seq_lens=b.seq_lens[:size],
            context_lens=b.context_lens[:size],
            block_tables=b.block_tables[:size],  # full rows: a replay may need every column
            slot_mapping=b.slot_mapping[:size],
        )
        layout = BatchLayout(
            num_reqs=size,
            num_tokens=size,
            num_prefill_reqs=0,
            max_query_len=1,
            max_seq_len=1,  # not a bound at replay: graph-safe backends read lengths on the device
            query_start_loc=np.arange(size + 1, dtype=np.int32),
            seq_lens=np.ones(size, dtype=np.int32),
            context_lens=np.zeros(size, dtype=np.int32),
            block_tables=np.zeros((size, 1), dtype=np.int32),
            slot_mapping=np.full(size, -1, dtype=np.int64),
            block_size=self.target.block_size,
            tensors=tensors,
        )
        return layout, b.input_ids[:size], b.positions[:size]

    def _new_pool(self) -> Any:
        return torch.cuda.graph_pool_handle()

    def _synchronize(self) -> None:
        torch.cuda.synchronize()

    def _capture(self, size: int, pool: Any) -> None:
        layout, input_ids, positions = self._layout(size)
        # Warm up on a side stream (compiles the Triton kernels, creates cuBLAS workspaces).
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):
                self.target.forward(layout, input_ids, positions)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=pool):
            hidden = self.target.forward(layout, input_ids, positions)
        self.graphs[size] = graph
        self.outputs[size] = hidden

    def _pad(self, n: int, size: int) -> None:
        """Make rows n..size-1 of the device buffers padding requests (see the module doc)."""
        b = self.buffers
        b.query_start_loc[n : size + 1].copy_(self.arange[n : size + 1])  # qsl[n] == n already
        b.seq_lens[n:size].fill_(1)
        b.context_lens[n:size].fill_(0)
        b.block_tables[n:size, 0].fill_(0)
        b.slot_mapping[n:size].fill_(-1)
        b.input_ids[n:size].fill_(0)
        b.positions[n:size].fill_(0)

    def can_replay(self, layout: BatchLayout) -> bool:
        """Decode-only steps (one new token per request) of at most the largest captured size."""
        return (
            layout.num_prefill_reqs == 0
            and layout.num_tokens == layout.num_reqs
            and 0 < layout.num_reqs <= self.max_size
        )

    def replay(self, layout: BatchLayout, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Run the step's graph; the runner has already filled rows 0..n-1 of its buffers."""
        n = layout.num_reqs
        size = int(self.bucket[n])
        if size > n:
            self._pad(n, size)
        self.graphs[size].replay()
        return self.outputs[size][:n]
