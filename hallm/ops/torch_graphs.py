"""Device graphs of engine steps, captured once and replayed, through `torch.cuda`'s graph API.

One runner serves the platforms whose torch build speaks that API: CUDA graphs on a CUDA build
and HIP graphs on a ROCm build (where `torch.cuda` is HIP). `capture_step_graphs(target)` is what
their `step_graphs` returns: after the KV cache exists, it captures two families of graphs over
the model runner's persistent device inputs (`StepGraphTarget.inputs`), sharing one memory pool,
so a replay picks up whatever the runner copied there for the step:

- **decode graphs**, one per batch size in `capture_sizes` (every request has one new token). A
  step of n decode requests replays the smallest captured size B >= n. Rows n..B-1 are padding
  requests: one token each, slot -1 (its key/value is not written), sequence length 1 read from
  block 0 (the null block, never handed out), token id 0 at position 0.
- **mixed graphs** (when the platform asks for them), one per token count in
  `mixed_capture_sizes`, for steps with prompt tokens: an eager prompt step launches every
  kernel of the model from Python, and up to a few thousand tokens that host time is longer
  than the GPU's work. Each is captured for all `max_num_reqs` request rows. A step of n
  requests and t tokens replays the smallest captured T >= t: requests n..R-1 are empty (their
  query range is [t, t)), tokens t..T-1 belong to no request and have slot -1. Larger steps
  keep the GPU busy longer than their launches take and run eagerly.

The graphs' memory pool (about the activations of the largest mixed step) comes out of what
`gpu_memory_utilization` leaves outside the KV cache; a mixed capture that fails (out of memory,
say) is logged and prompt steps run eagerly.

Padding rows' outputs are garbage that nothing reads: every operation of the model is row-wise
except attention, which is per request. A captured step bakes the attention metadata's host
values in: graph-safe backends take lengths from the device tensors and the host values only as
bounds, and a mixed graph is captured with the largest bounds (every query up to T tokens).

Only backends that declare `graph_safe = True` (no host reads in forward) are captured; otherwise the
engine stays eager and says why in the log. A decode capture that fails is an error that names
the cause (and `--enforce-eager`, which runs without graphs).
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
#: Largest mixed step captured, in tokens: past it a step's GPU work outlasts its launches.
MAX_MIXED_CAPTURE_TOKENS = 2048


def capture_sizes(max_reqs: int) -> list[int]:
    """1, 2, 4, 8, then every 16 up to 256, every 32 up to 512; capped at max_reqs (included)."""
    sizes = [1, 2, 4, 8, *range(16, 257, 16), *range(288, MAX_CAPTURE_SIZE + 1, 32)]
    return _capped(sizes, min(max_reqs, MAX_CAPTURE_SIZE))


def mixed_capture_sizes(max_tokens: int) -> list[int]:
    """Token counts 16, 32, 64, 128, 256, then every 64 up to 2048; capped at max_tokens
    (included). Padding costs GPU work where a step is GPU-bound (a large model's steps of a few
    hundred tokens already are): past 256 tokens a step pads by at most 63 tokens."""
    sizes = [16, 32, 64, 128, 256, *range(320, MAX_MIXED_CAPTURE_TOKENS + 1, 64)]
    return _capped(sizes, min(max_tokens, MAX_MIXED_CAPTURE_TOKENS))


def _capped(sizes: list[int], cap: int) -> list[int]:
    out = [s for s in sizes if s <= cap]
    if cap not in out:
        out.append(cap)
    return out


def capture_step_graphs(
    target: StepGraphTarget, sizes: list[int] | None = None, mixed_sizes: list[int] | None = None
) -> StepGraphs | None:
    """Capture the step graphs of `target`, or return None (eager) with the reason logged.

    sizes: the decode batch sizes (default `capture_sizes`). mixed_sizes: the token counts of
    mixed graphs (default none: prompt steps run eagerly). Raises RuntimeError naming the
    cause when a capture fails."""
    unsafe = sorted({type(b).name for b in target.backends if not type(b).graph_safe})
    if unsafe:
        logger.info("step graphs off: attention backend(s) %s are not graph-safe", unsafe)
        return None
    if target.inputs is None:
        logger.info("step graphs off: the model runner has no device input buffers")
        return None
    max_reqs = min(target.max_num_reqs, target.max_num_tokens)
    pool = _new_pool()
    mixed = None
    if mixed_sizes:
        try:
            mixed = MixedGraphs(target, mixed_sizes, pool)
        except Exception as exc:  # e.g. out of memory: prompt steps stay eager, as before
            if _distributed():
                # Every tensor-parallel rank must take the same path (graphed steps run T padded
                # tokens through the collectives, eager ones t): one rank falling back alone
                # would hang or corrupt the others' all-reduces.
                raise RuntimeError(
                    f"capturing the graphs of steps with prompt tokens failed on this rank "
                    f"({type(exc).__name__}: {exc}). Lower --gpu-memory-utilization to leave them "
                    "room, or run with --enforce-eager."
                ) from exc
            logger.warning(
                "capturing the graphs of steps with prompt tokens failed (%s: %s); those steps run "
                "eagerly. A lower --gpu-memory-utilization leaves their graphs room.",
                type(exc).__name__,
                exc,
            )
            _release()
            pool = _new_pool()
    try:
        decode = DecodeGraphs(target, sizes or capture_sizes(max_reqs), pool)
    except Exception as exc:
        raise RuntimeError(
            f"capturing the step graphs failed: {type(exc).__name__}: {exc}. "
            "Run with --enforce-eager to run without graphs, and report this error."
        ) from exc
    return StepGraphs(decode, mixed)


def capture_decode_graphs(target: StepGraphTarget, sizes: list[int] | None = None) -> StepGraphs | None:
    """Decode graphs only (`capture_step_graphs` without mixed graphs)."""
    return capture_step_graphs(target, sizes)


def _distributed() -> bool:
    """True in a process group of more than one rank (tensor parallelism)."""
    return (
        torch.distributed.is_available()
        and torch.distributed.is_initialized()
        and (torch.distributed.get_world_size() > 1)
    )


def _new_pool() -> Any:
    return torch.cuda.graph_pool_handle() if torch.cuda.is_available() else None


def _release() -> None:
    """Give a failed capture's memory back (its graphs and pool are unreferenced by now)."""
    import gc

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


class StepGraphs:
    """The graph runner the model runner calls: `can_replay(layout)`, `replay(layout, ids, pos)`."""

    def __init__(self, decode: DecodeGraphs, mixed: MixedGraphs | None = None) -> None:
        self.decode = decode
        self.mixed = mixed

    def _for(self, layout: BatchLayout) -> _PaddedGraphs | None:
        if self.decode.can_replay(layout):
            return self.decode
        if self.mixed is not None and self.mixed.can_replay(layout):
            return self.mixed
        return None

    def can_replay(self, layout: BatchLayout) -> bool:
        return self._for(layout) is not None

    def replay(self, layout: BatchLayout, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        graphs = self._for(layout)
        if graphs is None:
            raise ValueError(
                f"no graph captured for a step of {layout.num_reqs} requests, {layout.num_tokens} tokens"
            )
        return graphs.replay(layout, input_ids, positions)


class _PaddedGraphs:
    """Graphs by padded size, captured largest first (smaller graphs reuse its memory)."""

    kind = "step"

    def __init__(self, target: StepGraphTarget, sizes: list[int], pool: Any = None) -> None:
        assert target.inputs is not None  # checked by capture_step_graphs
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
            self._prepare()
            for size in reversed(self.sizes):
                self._capture(size, pool)
        self._synchronize()
        logger.info(
            "captured %d %s graphs (%s) in %.1f s",
            len(self.sizes),
            self.kind,
            self.sizes,
            time.perf_counter() - start,
        )

    def _prepare(self) -> None:
        """Fill the buffers the captures read with valid padding."""

    def _layout(self, size: int) -> tuple[BatchLayout, torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def _synchronize(self) -> None:
        torch.cuda.synchronize()

    def _capture(self, size: int, pool: Any) -> None:
        layout, input_ids, positions = self._layout(size)
        forward = self._forward
        # Warm up on a side stream (compiles the Triton kernels, creates cuBLAS workspaces).
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):
                forward(layout, input_ids, positions)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=pool):
            hidden = forward(layout, input_ids, positions)
        self.graphs[size] = graph
        self.outputs[size] = hidden

    def _forward(self, layout: BatchLayout, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """What a graph captures: the target's forward -> hidden [num_tokens, hidden_size]."""
        return self.target.forward(layout, input_ids, positions)

    def can_replay(self, layout: BatchLayout) -> bool:
        raise NotImplementedError

    def replay(self, layout: BatchLayout, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class DecodeGraphs(_PaddedGraphs):
    """Decode steps by batch size (see the module doc)."""

    kind = "decode"

    def _prepare(self) -> None:
        self._pad(0, self.max_size)

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


class MixedGraphs(_PaddedGraphs):
    """Steps with prompt tokens by token count, over every request row (see the module doc)."""

    kind = "mixed"

    def __init__(self, target: StepGraphTarget, sizes: list[int], pool: Any = None) -> None:
        self.max_reqs = target.max_num_reqs
        # Every mixed graph copies its hidden states into this one buffer, so the many graphs
        # keep one [T, hidden_size] output alive, not one each (set by the first capture).
        self.hidden: torch.Tensor | None = None
        super().__init__(target, [s for s in sizes if s <= target.max_num_tokens], pool)

    def _prepare(self) -> None:
        # Every request empty, every token unowned and unwritten; ids and positions 0. Later
        # steps leave valid ids and positions in rows past their tokens, so only the slots and
        # the empty requests' query ranges are reset before a replay.
        b = self.buffers
        b.query_start_loc[: self.max_reqs + 1].fill_(0)
        b.seq_lens[: self.max_reqs].fill_(0)
        b.context_lens[: self.max_reqs].fill_(0)
        b.block_tables[: self.max_reqs].fill_(0)
        if b.num_prompt_tokens is not None:
            b.num_prompt_tokens[: self.max_reqs].fill_(0)
        b.slot_mapping[: self.max_size].fill_(-1)
        b.input_ids[: self.max_size].fill_(0)
        b.positions[: self.max_size].fill_(0)

    def _forward(self, layout: BatchLayout, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        hidden = self.target.forward(layout, input_ids, positions)
        if self.hidden is None:  # the largest size, captured first
            self.hidden = torch.empty_like(hidden)
        out = self.hidden[: hidden.shape[0]]
        out.copy_(hidden)
        return out

    def _layout(self, size: int) -> tuple[BatchLayout, torch.Tensor, torch.Tensor]:
        b, r = self.buffers, self.max_reqs
        tensors = LayoutTensors(
            query_start_loc=b.query_start_loc[: r + 1],
            seq_lens=b.seq_lens[:r],
            context_lens=b.context_lens[:r],
            block_tables=b.block_tables[:r],
            slot_mapping=b.slot_mapping[:size],
            num_prompt_tokens=None if b.num_prompt_tokens is None else b.num_prompt_tokens[:r],
        )
        max_seq_len = b.block_tables.shape[1] * self.target.block_size
        # Host values as bounds: request 0 may hold every token (so none is padding to zero).
        qsl = np.full(r + 1, size, dtype=np.int32)
        qsl[0] = 0
        lens = np.zeros(r, dtype=np.int32)
        lens[0] = size
        layout = BatchLayout(
            num_reqs=r,
            num_tokens=size,
            num_prefill_reqs=1,
            max_query_len=size,
            max_seq_len=max_seq_len,
            query_start_loc=qsl,
            seq_lens=lens,
            context_lens=np.zeros(r, dtype=np.int32),
            block_tables=np.zeros((r, 1), dtype=np.int32),
            slot_mapping=np.full(size, -1, dtype=np.int64),
            block_size=self.target.block_size,
            tensors=tensors,
            num_prompt_tokens=lens,
        )
        return layout, b.input_ids[:size], b.positions[:size]

    def can_replay(self, layout: BatchLayout) -> bool:
        """Steps of at most the largest captured token count (any number of requests)."""
        return 0 < layout.num_tokens <= self.max_size and 0 < layout.num_reqs <= self.max_reqs

    def replay(self, layout: BatchLayout, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Run the step's graph; the runner has already filled its requests' rows and tokens."""
        n, t = layout.num_reqs, layout.num_tokens
        size = int(self.bucket[t])
        b = self.buffers
        if n < self.max_reqs:
            b.query_start_loc[n + 1 : self.max_reqs + 1].fill_(t)
        if size > t:
            b.slot_mapping[t:size].fill_(-1)
        self.graphs[size].replay()
        return self.outputs[size][:t]
