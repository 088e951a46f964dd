"""The engine loop in its own process, for serving.

The API process builds the `EngineConfig` once (so the device is resolved there) and starts
`run_engine_process` in a spawned child, which builds an `LLMEngine` from that plain data and
never probes a device again. The two talk over ZMQ PUSH/PULL sockets with the msgspec messages
of `hallm.core.engine_protocol`. With several API server processes (`--api-server-count`) every
one of them has its own pair: the engine's one inbox is connected to each of their request
sockets (ZMQ queues them fairly), and it has one outbox per API server. A request's deltas go to
the API server that sent it (`AddRequest.client`); stats, readiness and failures go to all.

The child does no text work at all: it receives token ids and sends, after every step, the new
token ids (and logprobs) of each request it touched, plus the engine's stats. Tokenization, chat
templates, detokenization, stop strings and HTTP all live in the API process, so none of them
ever delays an engine step; a stop string found there comes back as an abort.

The API process owns shutdown: it sends `Shutdown` (and kills the child if that does not work).
A Ctrl-C or a SIGTERM sent to the whole process group also reaches the child while the API
process drains its in-flight requests, so the child ignores SIGINT, and on SIGTERM keeps serving
until it is idle (or `TERM_GRACE_S` has passed, then aborts the rest) and exits 0. It also exits
when its parent disappears. Sends never block: a vanished peer cannot hang either side.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import time
from collections.abc import Sequence
from typing import Any

from hallm.core.engine_protocol import (
    AbortRequests,
    AddRequest,
    EngineFailed,
    EngineStats,
    Ready,
    RequestDelta,
    Shutdown,
    StartupFailed,
    StepOutputs,
    make_encoder,
    request_decoder,
)

logger = logging.getLogger("hallm.engine_process")

#: How long the idle loop sleeps in poll (ms) before checking that its parent is still alive.
_IDLE_POLL_MS = 500
#: The most messages taken from the inbox between two steps. Taking a request in (decoding its
#: ids, validating, queueing) costs host time; with async scheduling the device runs the step in
#: flight meanwhile, so a bounded batch overlaps its work, where a whole burst at once would leave
#: it idle. A step admits only what its token budget holds, so the rest would only wait in the
#: scheduler anyway.
MAX_MESSAGES_PER_STEP = 64
#: After SIGTERM, the longest the engine process keeps serving before it aborts what is left.
TERM_GRACE_S = 60.0
#: Set by the SIGTERM handler: when the grace period ends (time.monotonic()).
_terminate_deadline: float | None = None


class TokenIdsOnly:
    """What the engine process gives `LLMEngine` for a tokenizer: the EOS ids and nothing else.

    The engine needs a tokenizer only for its EOS ids, for text prompts and for detokenizing.
    Here prompts arrive as token ids and requests have `detokenize=False`, so the only other use
    is the text of logprob candidates, which the API process fills in: `decode` returns "".
    """

    def __init__(self, eos_token_ids: Sequence[int]) -> None:
        self.eos_token_id = list(eos_token_ids)

    def decode(self, token_ids: Any, **kwargs: Any) -> str:
        return ""


def run_engine_process(
    config_conn: Any,
    input_addresses: Sequence[str],
    output_addresses: Sequence[str],
    log_level: int = logging.INFO,
) -> None:
    """Entry point of the engine process (the target of a spawned `multiprocessing.Process`).

    The process starts importing the engine (torch, transformers, ...) at once, while the API
    process builds the config; it then receives `(config, eos_token_ids)` on `config_conn` (a
    multiprocessing pipe from its parent; `None` means "exit") and builds the engine.
    `input_addresses[i]` / `output_addresses[i]` are API server i's request and output sockets.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C goes to the API process, which stops us
    signal.signal(signal.SIGTERM, _on_sigterm)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("hallm").setLevel(log_level)

    import zmq

    from hallm.core.engine import LLMEngine
    from hallm.core.server_gc import prepare_server_gc

    parent_pid = os.getppid()
    try:
        received = config_conn.recv()
    except EOFError:
        received = None
    config_conn.close()
    if received is None or _terminate_deadline is not None:
        return
    config, eos_token_ids = received
    ctx = zmq.Context()
    inbox = ctx.socket(zmq.PULL)
    for address in input_addresses:
        inbox.connect(address)
    outboxes = []
    for address in output_addresses:
        outbox = ctx.socket(zmq.PUSH)
        outbox.setsockopt(zmq.LINGER, 2000)
        outbox.setsockopt(zmq.SNDHWM, 0)
        outbox.connect(address)
        outboxes.append(outbox)
    encoder = make_encoder()

    def send_all(message: Any) -> None:
        data = encoder.encode(message)
        for outbox in outboxes:
            outbox.send(data)

    code = 1
    try:
        try:
            engine = LLMEngine(config, TokenIdsOnly(eos_token_ids))
        except Exception as exc:
            logger.exception("the engine failed to start")
            send_all(StartupFailed(f"{type(exc).__name__}: {exc}"))
            engine = None
        if engine is not None:
            kv = engine.scheduler.kv
            ready = Ready(
                pid=os.getpid(),
                num_blocks=kv.num_blocks,
                num_usable_blocks=kv.num_usable_blocks,
                block_size=config.cache.block_size,
                max_model_len=config.model.max_model_len,
                stats=engine_stats(engine),
            )
            prepare_server_gc()
            send_all(ready)
            code = EngineLoop(engine, inbox, outboxes, parent_pid).run()
    except Exception as exc:
        logger.exception("the engine process failed")
        send_all(EngineFailed(f"{type(exc).__name__}: {exc}"))
    finally:
        inbox.close(linger=0)
        for outbox in outboxes:
            outbox.close()
        ctx.term()
    sys.exit(code)


def _on_sigterm(signum: int, frame: Any) -> None:
    global _terminate_deadline
    if _terminate_deadline is None:
        _terminate_deadline = time.monotonic() + TERM_GRACE_S


def engine_stats(engine: Any, num_aborted: int = 0) -> EngineStats:
    """The stats message from `LLMEngine.get_stats()` (plus the loop's abort count)."""
    s = engine.get_stats()
    return EngineStats(
        num_running=s["num_running"],
        num_waiting=s["num_waiting"],
        kv_cache_usage=float(s["kv_cache_usage"]),
        num_free_blocks=s["num_free_blocks"],
        num_blocks=s["num_blocks"],
        num_preemptions=s["num_preemptions"],
        prefix_cache_queries=s["prefix_cache_queries"],
        prefix_cache_hits=s["prefix_cache_hits"],
        num_aborted=num_aborted,
        kv_connector=s.get("kv_connector") or "",
        kv_connector_counters={
            k.removeprefix("kv_connector_"): int(v)
            for k, v in s.items()
            if k.startswith("kv_connector_") and isinstance(v, int)
        },
    )


class EngineLoop:
    """Drain the inbox, run a step, send what changed; block on the inbox only when idle.

    `outboxes[i]` is API server i's output socket; with one, every message goes there whole.
    """

    def __init__(self, engine: Any, inbox: Any, outboxes: Sequence[Any], parent_pid: int) -> None:
        self.engine = engine
        self.inbox = inbox
        self.outboxes = list(outboxes)
        self.parent_pid = parent_pid
        self.encoder = make_encoder()
        self.decoder = request_decoder()
        self.live: set[str] = set()  # ids of the requests queued and not yet finished
        #: request id -> the API server that sent it, with several of them
        self.owner: dict[str, int] = {}
        self.num_aborted = 0
        self.stopping = False

    def run(self) -> int:
        """Serve until `Shutdown` (exit code 0), a dead parent (0) or an engine error (1)."""
        import zmq

        poller = zmq.Poller()
        poller.register(self.inbox, zmq.POLLIN)
        last_stats: EngineStats | None = None
        while True:
            busy = self.engine.has_unfinished_requests()
            if not busy:
                stats = engine_stats(self.engine, self.num_aborted)
                if stats != last_stats:  # e.g. blocks freed by aborts: report them while idle
                    self._send_all(StepOutputs([], stats))
                    last_stats = stats
            if poller.poll(0 if busy else _IDLE_POLL_MS):
                self._drain(MAX_MESSAGES_PER_STEP)  # what is left makes the next poll return at once
            if self.stopping:
                self._shutdown()
                return 0
            deadline = _terminate_deadline
            if deadline is not None and (
                (not self.engine.has_unfinished_requests() and not poller.poll(0))
                or time.monotonic() > deadline
            ):
                logger.info("SIGTERM: the engine process exits")
                self._shutdown()
                return 0
            if os.getppid() != self.parent_pid:
                logger.warning("the API process is gone; the engine process exits")
                self._shutdown()
                return 0
            if not self.engine.has_unfinished_requests():
                continue
            try:
                message = self.step_message()
            except Exception as exc:
                logger.exception("engine step failed")
                self._send_all(EngineFailed(f"engine step failed: {type(exc).__name__}: {exc}"))
                try:  # stop the workers now (tensor-parallel ranks, Ray actors), not at exit
                    self.engine.shutdown()
                except Exception:
                    logger.exception("shutting down after the failed step")
                return 1
            last_stats = message.stats
            self._send_outputs(message)

    def step_message(self) -> StepOutputs:
        """Run one engine step; the message that reports it to the API process."""
        deltas = self.engine.step_deltas()
        for delta in deltas:
            if delta.finish_reason is not None:
                self.live.discard(delta.request_id)
        return StepOutputs(deltas, engine_stats(self.engine, self.num_aborted))

    def _send_outputs(self, message: StepOutputs) -> None:
        """A step's deltas, each to the API server that owns its request, the stats to all."""
        if len(self.outboxes) == 1:
            self._send(0, message)
            return
        routed: list[list[RequestDelta]] = [[] for _ in self.outboxes]
        owner = self.owner
        for delta in message.outputs:
            client = owner.get(delta.request_id, 0)
            if delta.finish_reason is not None:
                owner.pop(delta.request_id, None)
            routed[client].append(delta)
        for client, deltas in enumerate(routed):
            self._send(client, StepOutputs(deltas, message.stats))

    def _send_all(self, message: Any) -> None:
        for client in range(len(self.outboxes)):
            self._send(client, message)

    def _send(self, client: int, message: Any) -> None:
        import zmq

        try:
            self.outboxes[client].send(self.encoder.encode(message), zmq.NOBLOCK, copy=False)
        except zmq.Again:  # cannot be queued (not expected without a high-water mark): stop, never block
            self.stopping = True

    def _drain(self, limit: int | None = None) -> None:
        """Take what the inbox holds (at most `limit` messages), in order: add, abort, stop."""
        import zmq

        aborts: list[str] = []
        taken = 0
        while limit is None or taken < limit:
            taken += 1
            try:
                raw = self.inbox.recv(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                break
            try:
                msg = self.decoder.decode(raw.buffer)
            except Exception as exc:  # a bug in the API process: refuse the message, keep serving
                self._refuse_undecodable(raw.buffer, exc)
                continue
            if isinstance(msg, AddRequest):
                self._add(msg)
            elif isinstance(msg, AbortRequests):
                aborts.extend(msg.request_ids)
            elif isinstance(msg, Shutdown):
                self.stopping = True
        if aborts:
            self.engine.abort_request(aborts)
            for rid in aborts:
                self.owner.pop(rid, None)
                if rid in self.live:
                    self.live.discard(rid)
                    self.num_aborted += 1

    def _refuse_undecodable(self, raw: Any, exc: Exception) -> None:
        import msgspec

        logger.error("undecodable message from the API process: %s", exc)
        try:
            fields = msgspec.msgpack.decode(raw)
        except Exception:
            return
        if (
            isinstance(fields, list)
            and len(fields) > 1
            and fields[0] == "AddRequest"
            and isinstance(fields[1], str)
        ):
            # Which API server sent it is not known: all are told (the others ignore the id).
            self._refuse(fields[1], f"the engine could not decode the request: {exc}", None)

    def _refuse(self, request_id: str, error: str, client: int | None) -> None:
        stats = engine_stats(self.engine, self.num_aborted)
        message = StepOutputs([RequestDelta(request_id, [], finish_reason="abort", error=error)], stats)
        if client is None:
            self._send_all(message)
        elif 0 <= client < len(self.outboxes):
            self._send(client, message)

    def _add(self, msg: AddRequest) -> None:
        if not 0 <= msg.client < len(self.outboxes):  # a bug in an API process: nowhere to answer
            logger.error(
                "request %r names API server %d of %d", msg.request_id, msg.client, len(self.outboxes)
            )
            return
        if msg.params.n != 1:  # the API process queues each of n samples as a request of its own
            self._refuse(
                msg.request_id,
                f"the engine process takes one sequence per request (n=1), got n={msg.params.n}",
                msg.client,
            )
            return
        try:
            self.engine.add_token_ids(msg.request_id, msg.prompt_token_ids, msg.params)
        except Exception as exc:  # refused: tell the API process, keep serving the others
            self._refuse(
                msg.request_id,
                str(exc) if isinstance(exc, ValueError) else f"{type(exc).__name__}: {exc}",
                msg.client,
            )
            return
        self.live.add(msg.request_id)
        if len(self.outboxes) > 1:
            self.owner[msg.request_id] = msg.client

    def _shutdown(self) -> None:
        if self.live:
            self.engine.abort_request(list(self.live))
            self.live.clear()
            self.owner.clear()
        self.engine.shutdown()
