"""The step-graph runner (hallm.ops.torch_graphs, which CudaPlatform.step_graphs returns) without
a GPU: what it captures, how a replay of a smaller decode batch or of a step with prompt tokens
pads the buffers, and that a failing capture is an error naming its cause.

A stand-in graph replays by running the captured forward again over the same persistent buffers,
which is what a CUDA graph's replay does; the real capture runs in tests/gpu on the GPU machine.
"""

from __future__ import annotations

import itertools
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch

from hallm.ops.torch_graphs import (
    DecodeGraphs,
    MixedGraphs,
    StepGraphs,
    capture_decode_graphs,
    capture_sizes,
    mixed_capture_sizes,
)
from hallm.platforms.graphs import StepInputBuffers

MAX_REQS, MAX_BLOCKS = 8, 4


class Target:
    """A StepGraphTarget whose forward reads the buffers the way a model does: token ids,
    positions, and per-request lengths through the layout's tensors."""

    max_num_reqs = MAX_REQS
    max_num_tokens = 64
    block_size = 16

    def __init__(self, graph_safe: bool = True, fail: bool = False) -> None:
        self.backends = [type("Backend", (), {"name": "fake", "graph_safe": graph_safe})()]
        self.fail = fail
        self.inputs = StepInputBuffers(
            input_ids=torch.zeros(64, dtype=torch.int64),
            positions=torch.zeros(64, dtype=torch.int64),
            slot_mapping=torch.zeros(64, dtype=torch.int64),
            query_start_loc=torch.zeros(MAX_REQS + 1, dtype=torch.int32),
            seq_lens=torch.zeros(MAX_REQS, dtype=torch.int32),
            context_lens=torch.zeros(MAX_REQS, dtype=torch.int32),
            block_tables=torch.zeros(MAX_REQS, MAX_BLOCKS, dtype=torch.int32),
        )

    def forward(self, layout: Any, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        if self.fail:
            raise torch.cuda.OutOfMemoryError("no memory left for the graph pool")
        t = layout.tensors
        return (input_ids * 1000 + positions * 10 + t.seq_lens + t.block_tables[:, 0] * 100).float()


class Rerun:
    """Replays by running the captured forward again over the same buffers."""

    def _synchronize(self) -> None:
        pass

    def _capture(self, size: int, pool: Any) -> None:
        layout, ids, pos = self._layout(size)
        out = self._forward(layout, ids, pos)  # type: ignore[attr-defined]

        def replay() -> None:
            out.copy_(self._forward(layout, ids, pos))  # type: ignore[attr-defined]

        self.graphs[size] = SimpleNamespace(replay=replay)
        self.outputs[size] = out


class RerunGraphs(Rerun, DecodeGraphs):
    pass


class RerunMixed(Rerun, MixedGraphs):
    pass


def test_a_replay_of_a_smaller_batch_equals_the_eager_forward() -> None:
    target = Target()
    graphs = RerunGraphs(target, [1, 2, 4, 8])
    b = target.inputs
    n = 3  # replays the graph of 4, with one padding row
    ids, pos, seq = torch.tensor([5, 6, 7]), torch.tensor([11, 0, 3]), torch.tensor([12, 1, 4])
    b.input_ids[:n], b.positions[:n], b.seq_lens[:n] = ids, pos, seq
    b.query_start_loc[: n + 1] = torch.arange(n + 1)
    b.block_tables[:n, 0] = torch.tensor([2, 3, 1])
    layout = SimpleNamespace(num_reqs=n, num_tokens=n, num_prefill_reqs=0)
    assert graphs.can_replay(layout)
    with torch.inference_mode():  # as the model runner steps
        got = graphs.replay(layout, b.input_ids[:n], b.positions[:n])
    want = (ids * 1000 + pos * 10 + seq + torch.tensor([2, 3, 1]) * 100).float()
    assert torch.equal(got, want)
    # the padding row reads the null block with length 1 and writes nothing
    assert b.seq_lens[3] == 1 and b.block_tables[3, 0] == 0 and b.slot_mapping[3] == -1
    assert not graphs.can_replay(SimpleNamespace(num_reqs=2, num_tokens=5, num_prefill_reqs=1))
    assert not graphs.can_replay(SimpleNamespace(num_reqs=9, num_tokens=9, num_prefill_reqs=0))


def test_buckets_take_the_smallest_captured_size() -> None:
    graphs = RerunGraphs(Target(), [1, 2, 4, 8])
    assert [int(graphs.bucket[n]) for n in range(1, 9)] == [1, 2, 4, 4, 8, 8, 8, 8]
    assert graphs.outputs.keys() == {1, 2, 4, 8}


def test_a_failing_capture_is_an_error_that_names_the_cause(monkeypatch: pytest.MonkeyPatch) -> None:
    import hallm.ops.torch_graphs as graphs_mod

    monkeypatch.setattr(graphs_mod, "DecodeGraphs", RerunGraphs)
    with pytest.raises(RuntimeError, match=r"OutOfMemoryError: no memory left.*--enforce-eager"):
        capture_decode_graphs(Target(fail=True), [1, 2])


def test_graphs_stay_off_for_backends_that_are_not_graph_safe_or_without_device_inputs() -> None:
    assert capture_decode_graphs(Target(graph_safe=False)) is None
    target = Target()
    target.inputs = None  # type: ignore[assignment]
    assert capture_decode_graphs(target) is None


def test_capture_sizes() -> None:
    assert capture_sizes(1) == [1]
    assert capture_sizes(20) == [1, 2, 4, 8, 16, 20]
    sizes = capture_sizes(256)
    assert sizes[:5] == [1, 2, 4, 8, 16] and sizes[-1] == 256 and sizes == sorted(set(sizes))
    assert capture_sizes(10_000)[-1] == 512
    assert np.all(np.diff(capture_sizes(512)) > 0)


class MixedTarget(Target):
    """A forward that reads per-request lengths through the query ranges, as attention does, and
    records the slots a step would write."""

    def __init__(self) -> None:
        super().__init__()
        self.written: list[list[int]] = []

    def forward(self, layout: Any, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        t = layout.tensors
        qsl = t.query_start_loc
        token = torch.arange(input_ids.numel(), dtype=qsl.dtype)
        req = torch.searchsorted(qsl[1:], token, right=True)  # == num_reqs: a token of no request
        owned = req < t.seq_lens.numel()
        seq = torch.where(owned, t.seq_lens[req.clamp(max=t.seq_lens.numel() - 1)], -1)
        self.written.append(t.slot_mapping[t.slot_mapping >= 0].tolist())
        return (input_ids * 1000 + positions * 10 + seq * 100000 + req).float()


def _fill(b: Any, query_lens: list[int], ctx: list[int]) -> tuple[int, int]:
    n, t = len(query_lens), sum(query_lens)
    qsl = np.concatenate([[0], np.cumsum(query_lens)])
    b.query_start_loc[: n + 1] = torch.from_numpy(qsl.astype(np.int32))
    b.seq_lens[:n] = torch.tensor(np.add(query_lens, ctx), dtype=torch.int32)
    pos = np.concatenate([np.arange(c, c + q) for q, c in zip(query_lens, ctx, strict=True)])
    b.positions[:t] = torch.from_numpy(pos)
    b.input_ids[:t] = torch.arange(1, t + 1)
    b.slot_mapping[:t] = torch.from_numpy(pos + 16)
    return n, t


def test_a_mixed_step_replays_the_smallest_token_graph_with_empty_padding_requests() -> None:
    target = MixedTarget()
    graphs = RerunMixed(target, [16, 32, 64])
    assert graphs.outputs.keys() == {16, 32, 64}
    # one output buffer for every mixed graph
    assert all(o.data_ptr() == graphs.outputs[64].data_ptr() for o in graphs.outputs.values())
    b = target.inputs
    for query_lens, ctx in (([20, 1, 9], [0, 33, 4]), ([5, 1, 4], [2, 7, 0])):  # 30 -> 32, 10 -> 16
        n, t = _fill(b, query_lens, ctx)
        layout = SimpleNamespace(num_reqs=n, num_tokens=t, num_prefill_reqs=2)
        assert graphs.can_replay(layout)
        with torch.inference_mode():
            got = graphs.replay(layout, b.input_ids[:t], b.positions[:t]).clone()
        size = 32 if t > 16 else 16
        # the eager forward of the same step, over exactly its requests and tokens
        exact = SimpleNamespace(
            tensors=SimpleNamespace(
                query_start_loc=b.query_start_loc[: n + 1],
                seq_lens=b.seq_lens[:n],
                slot_mapping=b.slot_mapping[:t],
            )
        )
        want = target.forward(exact, b.input_ids[:t], b.positions[:t])
        assert torch.equal(got, want)
        # padding requests are empty at t; padding tokens are written nowhere
        assert b.query_start_loc[n + 1 : MAX_REQS + 1].tolist() == [t] * (MAX_REQS - n)
        assert b.slot_mapping[t:size].tolist() == [-1] * (size - t)
        assert target.written[-1] == target.written[-2] == b.slot_mapping[:t].tolist()
    assert not graphs.can_replay(SimpleNamespace(num_reqs=2, num_tokens=65, num_prefill_reqs=1))
    assert not graphs.can_replay(SimpleNamespace(num_reqs=MAX_REQS + 1, num_tokens=20, num_prefill_reqs=1))


def test_step_graphs_replay_decode_graphs_for_decode_steps_and_mixed_graphs_for_prompts() -> None:
    target = MixedTarget()
    mixed = RerunMixed(target, [16, 32])
    decode = RerunGraphs(target, [1, 2, 4, 8])
    graphs = StepGraphs(decode, mixed)
    assert graphs._for(SimpleNamespace(num_reqs=3, num_tokens=3, num_prefill_reqs=0)) is decode
    assert graphs._for(SimpleNamespace(num_reqs=3, num_tokens=9, num_prefill_reqs=1)) is mixed
    assert not graphs.can_replay(SimpleNamespace(num_reqs=3, num_tokens=40, num_prefill_reqs=1))
    assert not StepGraphs(decode).can_replay(SimpleNamespace(num_reqs=3, num_tokens=9, num_prefill_reqs=1))
    # a decode replay after a mixed one (shared buffers) still pads its own rows
    b = target.inputs
    n, t = _fill(b, [1, 1, 1], [4, 8, 2])
    with torch.inference_mode():
        got = graphs.replay(
            SimpleNamespace(num_reqs=n, num_tokens=t, num_prefill_reqs=0), b.input_ids[:t], b.positions[:t]
        )
    assert got.shape == (3,) and b.query_start_loc[:5].tolist() == [0, 1, 2, 3, 4]
    with pytest.raises(ValueError, match="no graph captured for a step of 3 requests, 40 tokens"):
        graphs.replay(
            SimpleNamespace(num_reqs=3, num_tokens=40, num_prefill_reqs=1), b.input_ids, b.positions
        )


def test_mixed_capture_sizes() -> None:
    assert mixed_capture_sizes(64) == [16, 32, 64]
    assert mixed_capture_sizes(100) == [16, 32, 64, 100]
    sizes = mixed_capture_sizes(8192)
    assert sizes[-1] == 2048 and sizes == sorted(set(sizes))
    # past 256 tokens a step pads by at most 63 tokens
    large = [s for s in sizes if s >= 256]
    assert all(b - a == 64 for a, b in itertools.pairwise(large))


def test_a_failing_mixed_capture_leaves_decode_graphs_and_eager_prompt_steps(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    import hallm.ops.torch_graphs as graphs_mod

    class OutOfMemoryMixed(RerunMixed):
        def _capture(self, size: int, pool: Any) -> None:
            raise torch.cuda.OutOfMemoryError("no memory left for a 64-token step")

    monkeypatch.setattr(graphs_mod, "DecodeGraphs", RerunGraphs)
    monkeypatch.setattr(graphs_mod, "MixedGraphs", OutOfMemoryMixed)
    with caplog.at_level("WARNING", logger="hallm.ops.graphs"):
        graphs = graphs_mod.capture_step_graphs(MixedTarget(), [1, 2], mixed_sizes=[16, 64])
    assert graphs is not None and graphs.mixed is None and graphs.decode.sizes == [1, 2]
    assert "OutOfMemoryError: no memory left for a 64-token step" in caplog.text
    assert not graphs.can_replay(SimpleNamespace(num_reqs=2, num_tokens=9, num_prefill_reqs=1))


def test_a_failing_mixed_capture_under_tensor_parallelism_raises(monkeypatch: pytest.MonkeyPatch) -> None:
    """Ranks must agree: one rank falling back to eager prompt steps alone would run t tokens
    through the all-reduces where the others run T."""
    import hallm.ops.torch_graphs as graphs_mod

    class OutOfMemoryMixed(RerunMixed):
        def _capture(self, size: int, pool: Any) -> None:
            raise torch.cuda.OutOfMemoryError("no memory left for a 64-token step")

    monkeypatch.setattr(graphs_mod, "DecodeGraphs", RerunGraphs)
    monkeypatch.setattr(graphs_mod, "MixedGraphs", OutOfMemoryMixed)
    monkeypatch.setattr(graphs_mod, "_distributed", lambda: True)
    with pytest.raises(RuntimeError, match=r"on this rank.*OutOfMemoryError.*--gpu-memory-utilization"):
        graphs_mod.capture_step_graphs(MixedTarget(), [1, 2], mixed_sizes=[16, 64])
