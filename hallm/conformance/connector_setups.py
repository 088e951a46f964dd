"""How the kit sets up each connector for its round trip (connectors.py), and the faults it
injects into the core's connectors.

A plugin's connector gets the engine config of the tiny model and no `kv_transfer` (one that
needs more configuration, a server address, reads it from its environment); the generic checks
apply to it. The core's connectors run on every device with their real configuration:

- `shared_storage`: a producer and a consumer engine over one temporary directory; faults: the
  block files deleted, then truncated, after the consumer's scheduler side offered them.
- `offload`: one engine (the host tier is its own); fault: a host tier of two blocks that had to
  evict the prompt's first block offers nothing of the prompt.
- `p2p`: a consumer listening on a free local port and a producer pushing to it, in this
  process; faults: the consumer evicts offered blocks before the load (its receive buffer holds
  four blocks and a second prompt arrives), a producer whose peer is not listening, or listens
  and never answers (died mid-transfer).
"""

from __future__ import annotations

import dataclasses
import socket
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import zmq

from hallm.conformance.connectors import DST_BLOCKS, StepResult

if TYPE_CHECKING:
    from hallm.conformance.connectors import RoundTrip

KvConfig = Callable[["RoundTrip"], "dict[str, Any] | None"]
Fault = Callable[["RoundTrip"], None]


@dataclasses.dataclass
class ConnectorSetup:
    name: str
    cls: type
    origin: str  # for messages: origin or the plugin's origin
    core: bool  # a core connector: exact counts (offers, tokens_saved) are checked
    producer_kv: KvConfig
    consumer_kv: KvConfig
    same_engine: bool = False  # the consumer is the producer (a tier of one engine's own)
    faults: list[Fault] = dataclasses.field(default_factory=list)


CORE_CONNECTORS = ("shared_storage", "offload", "p2p")


def plugin_setup(name: str, cls: type, origin: str) -> ConnectorSetup:
    return ConnectorSetup(name, cls, origin, False, lambda _: None, lambda _: None)


def core_setup(name: str, workdir: Path, device: str) -> ConnectorSetup:
    """The core connector `name` on `device` (the target's origin, for messages)."""
    from hallm.core.kv_connectors import core_connectors

    cls = core_connectors()[name]
    origin = f"the core, on {device}"
    if name == "shared_storage":
        path = str(workdir / "kv")

        def storage(role: str) -> KvConfig:
            extra = {"shared_storage_path": path}
            return lambda _: {"kv_connector": name, "kv_role": role, "kv_connector_extra_config": extra}

        faults = [_files_fault(workdir / "kv", "deleted"), _files_fault(workdir / "kv", "truncated")]
        return ConnectorSetup(
            name, cls, origin, True, storage("kv_producer"), storage("kv_consumer"), faults=faults
        )
    if name == "offload":

        def offload(trip: RoundTrip) -> dict[str, Any]:
            return _offload_kv(8 * trip.bytes_per_block())

        return ConnectorSetup(
            name, cls, origin, True, offload, offload, same_engine=True, faults=[_host_tier_full]
        )
    if name == "p2p":
        port = free_port()

        def consumer(trip: RoundTrip) -> dict[str, Any]:
            # Room for four blocks: the prompt's three, then a second prompt evicts the oldest.
            cap = 4 * block_blob_bytes(trip)
            return _p2p_kv("kv_consumer", kv_listen_port=port, recv_buffer_bytes=cap)

        def producer(trip: RoundTrip) -> dict[str, Any]:
            return _p2p_kv("kv_producer", kv_peer=f"127.0.0.1:{port}")

        faults = [_peer_evicts, _peer_down, _peer_silent]
        return ConnectorSetup(name, cls, origin, True, producer, consumer, faults=faults)
    raise ValueError(f"no kit setup for core connector {name!r}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def block_blob_bytes(trip: RoundTrip) -> int:
    """The bytes of one block of every layer as the core's connectors send and store it."""
    from hallm.core.kv_connectors.blocks import encode_block

    return len(encode_block([c[:, 0].cpu() for c in trip.src.values()]))


def _offload_kv(cpu_bytes: int) -> dict[str, Any]:
    return {
        "kv_connector": "offload",
        "kv_role": "kv_both",
        "kv_connector_extra_config": {"cpu_bytes": cpu_bytes},
    }


def _p2p_kv(role: str, **extra: Any) -> dict[str, Any]:
    return {"kv_connector": "p2p", "kv_role": role, "kv_connector_extra_config": extra}


def _expect_failed_load(trip: RoundTrip, req: Any, result: StepResult, what: str) -> None:
    if req.request_id not in result.failed:
        trip.fail(
            f"{what}, yet failed_loads() did not name the request: the engine would take the load as done "
            "and compute on whatever those blocks held, instead of recomputing the prompt"
        )


# ---- shared_storage ---------------------------------------------------------------------------


def _files_fault(root: Path, how: str) -> Fault:
    def fault(trip: RoundTrip) -> None:
        assert trip.consumer is not None
        req = trip.request(trip.prompt)
        n = trip.offer(trip.consumer, req)
        files = sorted(root.rglob("*.kvb"))
        if not n or not files:
            trip.fail(f"nothing to load before the {how}-file fault (offered {n}, {len(files)} block files)")
        kept = {f: f.read_bytes() for f in files}

        def damage() -> None:
            for f, data in kept.items():
                if how == "deleted":
                    f.unlink()
                else:
                    f.write_bytes(data[: len(data) // 2])

        try:
            result, _ = trip.load(trip.consumer, req, DST_BLOCKS, n, before_load=damage)
        finally:
            for f, data in kept.items():
                f.write_bytes(data)
        _expect_failed_load(trip, req, result, f"the offered block files were {how} before the load")

    return fault


# ---- offload ----------------------------------------------------------------------------------


def _host_tier_full(trip: RoundTrip) -> None:
    """Two host slots for a three-block prompt: storing the third block evicts the first, so the
    prompt's leading block is gone and nothing of it may be offered."""
    side = trip.side(
        "engine with a two-block host tier", _offload_kv(2 * trip.bytes_per_block()), trip.empty_caches()
    )
    for name, cache in side.caches.items():
        cache.copy_(trip.src[name])
    try:
        trip.save(side, trip.prompt)
    except Exception as e:
        trip.fail(f"saving into a full host tier raised {e!r}; it must evict, never fail the step")
    n = trip.offer(side, trip.request(trip.prompt))
    if n:
        trip.fail(
            f"a host tier of two blocks stored a three-block prompt (evicting its first block) and then offers "
            f"{n} tokens of it: only blocks still held, in order from the first, can be offered"
        )


# ---- p2p --------------------------------------------------------------------------------------


def _peer_evicts(trip: RoundTrip) -> None:
    """The consumer offers the prompt, then a second prompt arrives and its receive buffer (four
    blocks) evicts the prompt's first two before the load step is built."""
    assert trip.consumer is not None and trip.producer is not None
    req = trip.request(trip.prompt)
    n = trip.offer(trip.consumer, req)
    if not n:
        trip.fail("the consumer offers nothing of the prompt before the eviction fault")
    sent = trip.save(trip.producer, trip.other_prompt())
    if sent.stats.get("save_failures", 0):
        trip.fail(f"pushing a second prompt to a live consumer reported {sent.stats}")
    result, _ = trip.load(trip.consumer, req, DST_BLOCKS, n)
    _expect_failed_load(trip, req, result, "the consumer evicted offered blocks before the load")


def _dead_peer_save(trip: RoundTrip, port: int, how: str) -> None:
    kv = _p2p_kv("kv_producer", kv_peer=f"127.0.0.1:{port}", send_timeout_s=0.5)
    side = trip.side(f"producer whose peer {how}", kv, trip.src)
    try:
        result = trip.save(side, trip.other_prompt())
    except Exception as e:
        trip.fail(f"a save to a peer that {how} raised {e!r}; it must cost the save, never the step")
    if result.stats.get("save_failures", 0) != 3 or result.stats.get("tokens_saved", 0):
        trip.fail(
            f"a save of 3 blocks to a peer that {how} reported {result.stats}; expected save_failures=3 "
            "and nothing saved"
        )


def _peer_down(trip: RoundTrip) -> None:
    _dead_peer_save(trip, free_port(), "is not listening")


def _peer_silent(trip: RoundTrip) -> None:
    ctx = zmq.Context()
    silent = ctx.socket(zmq.ROUTER)
    try:
        port = silent.bind_to_random_port("tcp://127.0.0.1")
        _dead_peer_save(trip, port, "takes the message and never answers")
    finally:
        silent.close(linger=0)
        ctx.term()
