"""The serving engine process's loop takes requests in bounded batches (so its intake is spread
over steps, overlapping the device's, instead of stalling it), in order, losing none: over real
ZMQ sockets, every request of a burst finishes with its tokens."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import zmq

from hallm.core.engine import LLMEngine
from hallm.core.engine_args import EngineArgs
from hallm.core.engine_process import MAX_MESSAGES_PER_STEP, EngineLoop, TokenIdsOnly
from hallm.core.engine_protocol import (
    AbortRequests,
    AddRequest,
    Shutdown,
    StepOutputs,
    make_encoder,
    output_decoder,
)
from hallm.core.sampling_params import SamplingParams


@pytest.fixture(scope="module")
def model_dir(tiny_model_dir: Callable[[str], Path]) -> str:
    return str(tiny_model_dir("llama"))


def make_engine(model_dir: str) -> LLMEngine:
    args = EngineArgs(
        model=model_dir, device="cpu", dtype="float32", seed=0, max_model_len=64, max_num_seqs=256
    )
    return LLMEngine(args.create_engine_config(), TokenIdsOnly([1]))


def params(max_tokens: int) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True, detokenize=False)


class Frame:
    def __init__(self, data: bytes) -> None:
        self.buffer = data


class Inbox:
    """The loop's PULL socket, holding queued messages."""

    def __init__(self, messages: list[Any]) -> None:
        encoder = make_encoder()
        self.queued = [encoder.encode(m) for m in messages]

    def recv(self, flags: int = 0, copy: bool = True) -> Frame:
        if not self.queued:
            raise zmq.Again()
        return Frame(self.queued.pop(0))


def test_a_busy_loop_takes_a_bounded_batch_in_order(model_dir: str) -> None:
    n = MAX_MESSAGES_PER_STEP + 36
    messages: list[Any] = [AddRequest(f"r{i}", [5 + i % 50, 6, 7], params(2)) for i in range(n)]
    messages.append(AbortRequests([f"r{n - 1}"]))  # after its request: applied with it, in order
    loop = EngineLoop(make_engine(model_dir), inbox=Inbox(messages), outboxes=[None], parent_pid=0)
    loop._drain(MAX_MESSAGES_PER_STEP)
    assert loop.live == {f"r{i}" for i in range(MAX_MESSAGES_PER_STEP)}
    loop._drain(MAX_MESSAGES_PER_STEP)
    assert loop.live == {f"r{i}" for i in range(n - 1)} and loop.num_aborted == 1
    assert loop.engine.scheduler.num_waiting == n - 1


class CountingLoop(EngineLoop):
    """Records how many requests each drain of the inbox added."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.added = 0
        self.added_per_drain: list[int] = []

    def _add(self, msg: AddRequest) -> None:
        self.added += 1
        super()._add(msg)

    def _drain(self, limit: int | None = None) -> None:
        before = self.added
        super()._drain(limit)
        self.added_per_drain.append(self.added - before)


def test_a_burst_over_real_sockets_all_finishes(model_dir: str) -> None:
    ctx = zmq.Context()
    requests, inbox = ctx.socket(zmq.PUSH), ctx.socket(zmq.PULL)
    inbox.bind("inproc://requests")
    requests.connect("inproc://requests")
    outbox, outputs = ctx.socket(zmq.PUSH), ctx.socket(zmq.PULL)
    outputs.bind("inproc://outputs")
    outbox.connect("inproc://outputs")
    loop = CountingLoop(make_engine(model_dir), inbox, [outbox], parent_pid=os.getppid())
    encoder, decoder = make_encoder(), output_decoder()
    codes: list[int] = []
    thread = threading.Thread(target=lambda: codes.append(loop.run()), daemon=True)
    thread.start()
    try:
        # one long request keeps the loop busy while the burst arrives
        requests.send(encoder.encode(AddRequest("long", [9, 10, 11], params(40))))
        burst = 3 * MAX_MESSAGES_PER_STEP
        for i in range(burst):
            requests.send(encoder.encode(AddRequest(f"b{i}", [5 + i % 50, 6, 7, 8], params(3))))
        tokens: dict[str, list[int]] = {}
        finished: dict[str, str] = {}
        while len(finished) < burst + 1:
            assert outputs.poll(60_000), "the engine loop stopped answering"
            msg = decoder.decode(outputs.recv())
            assert isinstance(msg, StepOutputs)
            for d in msg.outputs:
                assert d.error is None, d.error
                tokens.setdefault(d.request_id, []).extend(d.token_ids)
                if d.finish_reason is not None:
                    finished[d.request_id] = d.finish_reason
        assert finished == {"long": "length", **{f"b{i}": "length" for i in range(burst)}}
        assert len(tokens["long"]) == 40 and all(len(tokens[f"b{i}"]) == 3 for i in range(burst))
        # the burst came in batches of at most the cap, not all at once
        assert sum(loop.added_per_drain) == burst + 1
        assert max(loop.added_per_drain) <= MAX_MESSAGES_PER_STEP
    finally:
        requests.send(encoder.encode(Shutdown()))
        thread.join(60)
        for sock in (requests, inbox, outbox, outputs):
            sock.close(linger=0)
        ctx.term()
    assert codes == [0]


class RefusalLoop(EngineLoop):
    """Records the loop's refusals instead of sending them."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.refused: dict[str, str] = {}

    def _refuse(self, request_id: str, error: str, client: int | None) -> None:
        self.refused[request_id] = error


def test_the_loop_admits_decoded_ids_and_refuses_what_the_model_cannot_take(model_dir: str) -> None:
    """A decoded AddRequest holds ints only (its schema refuses a bool or a float): the loop takes
    its ids without a per-id type check, and the admission checks still refuse ids outside the
    vocabulary, an empty prompt and a reused request id, each by name, keeping the good ones."""
    engine = make_engine(model_dir)
    vocab = int(engine.config.model.hf_config.vocab_size)
    messages = [
        AddRequest("good", [5, 6, 7], params(2)),
        AddRequest("past-vocab", [5, vocab], params(2)),
        AddRequest("negative", [-1, 5], params(2)),
        AddRequest("empty", [], params(2)),
        AddRequest("good", [8, 9], params(2)),
    ]
    loop = RefusalLoop(engine, inbox=Inbox(messages), outboxes=[None], parent_pid=0)
    loop._drain()
    assert loop.live == {"good"} and engine.scheduler.num_waiting == 1
    assert set(loop.refused) == {"past-vocab", "negative", "empty", "good"}
    assert f"token id {vocab}, outside the vocabulary" in loop.refused["past-vocab"]
    assert "prompt_token_ids has token id -1" in loop.refused["negative"]
    assert "prompt_token_ids is empty" in loop.refused["empty"]
    assert "'good' is already in use" in loop.refused["good"]


class Outbox:
    """One API server's output socket, keeping the decoded messages."""

    def __init__(self) -> None:
        self.sent: list[Any] = []

    def send(self, data: Any, flags: int = 0, copy: bool = True) -> None:
        self.sent.append(output_decoder().decode(data))

    def tokens(self) -> dict[str, list[int]]:
        out: dict[str, list[int]] = {}
        for message in self.sent:
            for delta in message.outputs:
                out.setdefault(delta.request_id, []).extend(delta.token_ids)
        return out


def test_with_several_api_servers_each_gets_its_own_requests_and_every_step_s_stats(model_dir: str) -> None:
    """A request's deltas (and a refusal) go back to the API server that sent it; every API
    server gets the stats of every step; an aborted request's owner is forgotten."""
    messages: list[Any] = [
        AddRequest("a0", [5, 6, 7], params(3), client=0),
        AddRequest("b0", [8, 9], params(2), client=1),
        AddRequest("b1", [10, 11, 12], params(3), client=1),
        AddRequest("b-bad", [5, 100_000], params(2), client=1),  # outside the vocabulary: refused
        AddRequest("c-nowhere", [5, 6], params(2), client=2),  # no such API server: dropped
        AddRequest("a-aborted", [5, 6, 7, 8], params(50), client=0),
    ]
    outboxes = [Outbox(), Outbox()]
    loop = EngineLoop(make_engine(model_dir), inbox=Inbox(messages), outboxes=outboxes, parent_pid=0)
    loop._drain()
    assert loop.live == {"a0", "b0", "b1", "a-aborted"}
    assert loop.owner == {"a0": 0, "b0": 1, "b1": 1, "a-aborted": 0}
    (refusal,) = outboxes[1].sent
    assert refusal.outputs[0].request_id == "b-bad" and refusal.outputs[0].error
    outboxes[1].sent.clear()
    loop.inbox = Inbox([AbortRequests(["a-aborted"])])
    loop._drain()
    assert "a-aborted" not in loop.owner
    steps = 0
    while loop.engine.has_unfinished_requests():
        loop._send_outputs(loop.step_message())
        steps += 1
    assert outboxes[0].tokens().keys() == {"a0"} and len(outboxes[0].tokens()["a0"]) == 3
    assert outboxes[1].tokens().keys() == {"b0", "b1"}
    assert [len(outboxes[1].tokens()[r]) for r in ("b0", "b1")] == [2, 3]
    assert len(outboxes[0].sent) == len(outboxes[1].sent) == steps  # stats with every step, to both
    assert all(isinstance(m, StepOutputs) for m in outboxes[0].sent + outboxes[1].sent)
    assert loop.owner == {} and loop.live == set()
