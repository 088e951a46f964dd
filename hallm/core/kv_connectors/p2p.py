"""`p2p`: a prefill instance pushes each computed prompt's KV blocks straight to a decode
instance over ZMQ/TCP; the decode instance keeps what it received in host memory, keyed by the
prefix-cache block hash, and loads it when the request arrives.

The decode side (kv_consumer, or kv_both) listens on `kv_listen_port` (`kv_listen_host`,
default 127.0.0.1) from its scheduler side: a background thread takes messages [model identity,
hash, block, hash, block, ...] (blocks.encode_block: length and checksum inside), keeps them up
to `recv_buffer_bytes` (default 1 GiB; oldest out) and answers b"ok" (or b"mismatch" for
another model's KV). The prefill side (kv_producer, or kv_both with `kv_peer`) sends after the
step that completes a prompt and waits for that answer up to `send_timeout_s` (default 10 s),
so when the prefill request returns, its KV is at the decode instance. A peer that is down, dies
mid-transfer or does not answer costs the send ("save_failures", logged), never the prefill;
the decode instance then computes the prompt itself. Blocks the peer acknowledged are not sent
again. One decode peer per prefill instance (1P1D, or nP1D); a proxy sends each request to
the prefill instance with max_tokens=1, then to the decode instance
(examples/disagg_proxy.py).

With tensor parallelism (both instances split over the same number of ranks) each prefill rank
r pushes its shard of the KV heads to port `kv_peer`'s port + r, and the decode instance listens
on `kv_listen_port` + r for each of its ranks (so it takes ports kv_listen_port ..
kv_listen_port + ranks - 1; `recv_buffer_bytes` is their total). Each message names the model,
the number of ranks and the rank, so a shard never lands with another split or another rank
(answered b"mismatch"). A block is offered only when every rank's shard has arrived; the step
meta carries every rank's shard of it and each rank's worker side loads its own.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import threading
from collections import OrderedDict
from typing import Any

import torch
import zmq

from hallm.core.kv_connectors.blocks import (
    block_hashes,
    check_layout,
    decode_block,
    encode_block,
    gather_blocks,
    loadable_tokens,
    model_identity,
)
from hallm.platforms import BatchLayout, ConfigError, KVConnector, KVConnectorRole

logger = logging.getLogger("hallm.kv_connector")

DEFAULT_BUFFER_BYTES = 1 << 30
_DELIVERED_MEMORY = 1 << 16  # block hashes remembered as delivered (not sent again)


@dataclasses.dataclass
class P2PStepMeta:
    # request id -> [(block id, the received block's shard of each rank, by rank)]
    loads: dict[str, list[tuple[int, tuple[bytes, ...]]]]
    sends: list[tuple[int, bytes]]  # (block id, block hash) to push after the forward


@dataclasses.dataclass(frozen=True)
class P2PSettings:
    peer: str | None  # "host:port" of the decode instance
    listen: tuple[str, int] | None
    buffer_bytes: int
    send_timeout_s: float


def p2p_settings(config: Any) -> P2PSettings:
    kv = config.kv_transfer
    extra = kv.kv_connector_extra_config if kv is not None else {}
    role = kv.kv_role if kv is not None else "kv_both"
    peer = extra.get("kv_peer")
    if peer is not None and (not isinstance(peer, str) or not peer.rpartition(":")[2].isdigit()):
        raise ConfigError(
            f"the p2p KV connector's kv_peer must be 'host:port' (the decode instance), got {peer!r}"
        )
    if role == "kv_producer" and peer is None:
        raise ConfigError(
            "the p2p KV connector as kv_producer needs kv_peer: 'host:port' of the decode instance"
        )
    port = extra.get("kv_listen_port")
    listen = None
    if role in ("kv_consumer", "kv_both"):
        if isinstance(port, bool) or not isinstance(port, int) or not 0 < port < 65536:
            raise ConfigError(
                f"the p2p KV connector as {role} needs kv_listen_port (a TCP port), got {port!r}"
            )
        ranks = int(getattr(getattr(config, "parallel", None), "tensor_parallel_size", 1))
        if port + ranks - 1 >= 65536:
            raise ConfigError(
                f"the p2p KV connector listens on kv_listen_port + rank for each of its {ranks} ranks; "
                f"kv_listen_port={port} runs past 65535"
            )
        listen = (str(extra.get("kv_listen_host", "127.0.0.1")), port)
    buffer_bytes = extra.get("recv_buffer_bytes", DEFAULT_BUFFER_BYTES)
    if isinstance(buffer_bytes, bool) or not isinstance(buffer_bytes, int) or buffer_bytes <= 0:
        raise ConfigError(f"recv_buffer_bytes must be a positive integer, got {buffer_bytes!r}")
    timeout = extra.get("send_timeout_s", 10.0)
    if isinstance(timeout, bool) or not isinstance(timeout, int | float) or timeout <= 0:
        raise ConfigError(f"send_timeout_s must be a positive number of seconds, got {timeout!r}")
    return P2PSettings(peer, listen, buffer_bytes, float(timeout))


class _Receiver:
    """The decode side's listener: received blocks by hash, oldest evicted past the byte cap."""

    def __init__(self, host: str, port: int, identity: bytes, cap: int) -> None:
        self.identity, self.cap = identity, cap
        self.blocks: OrderedDict[bytes, bytes] = OrderedDict()
        self.bytes = 0
        self.lock = threading.Lock()
        self.received = 0
        self._ctx = zmq.Context()
        self._sock = self._ctx.socket(zmq.ROUTER)
        self._sock.setsockopt(zmq.LINGER, 0)
        try:
            self._sock.bind(f"tcp://{host}:{port}")
        except zmq.ZMQError as e:
            self._sock.close()
            raise ConfigError(f"the p2p KV connector cannot listen on {host}:{port}: {e}") from None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="hallm-kv-p2p-recv", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        poller = zmq.Poller()
        poller.register(self._sock, zmq.POLLIN)
        while not self._stop.is_set():
            if not poller.poll(100):
                continue
            frames = self._sock.recv_multipart()
            sender, body = frames[0], frames[1:]
            if not body or body[0] != self.identity or len(body) % 2 != 1:
                self._sock.send_multipart([sender, b"mismatch"])
                continue
            with self.lock:
                for h, blob in zip(body[1::2], body[2::2], strict=True):
                    if h in self.blocks:
                        self.blocks.move_to_end(h)
                        continue
                    self.blocks[h] = blob
                    self.bytes += len(blob)
                    self.received += 1
                while self.bytes > self.cap and self.blocks:
                    _, old = self.blocks.popitem(last=False)
                    self.bytes -= len(old)
            self._sock.send_multipart([sender, b"ok"])
        self._sock.close()
        self._ctx.term()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


class P2PConnector(KVConnector):
    name = "p2p"

    def __init__(self, config: Any, role: KVConnectorRole) -> None:
        super().__init__(config, role)
        self.settings = p2p_settings(config)
        self.block_size = int(config.cache.block_size)
        self.model_id = model_identity(config)
        self.produces = self.settings.peer is not None
        #: The decode side's listeners, one per rank (rank r's shards on port + r).
        self._receivers: list[_Receiver] = []
        if role == KVConnectorRole.SCHEDULER and self.settings.listen is not None:
            host, port = self.settings.listen
            cap = max(1, self.settings.buffer_bytes // self.tp_size)
            for r in range(self.tp_size):
                self._receivers.append(_Receiver(host, port + r, self.identity(r), cap))
        self._loads: dict[str, list[tuple[int, tuple[bytes, ...]]]] = {}
        self._sends: list[tuple[int, bytes]] = []
        # worker side
        self._caches: dict[str, torch.Tensor] = {}
        self._meta: P2PStepMeta | None = None
        self._failed: set[str] = set()
        self._gathered: dict[str, torch.Tensor] = {}
        self._delivered: OrderedDict[bytes, None] = OrderedDict()
        self._stats: dict[str, int] = {}
        self._ctx: zmq.Context[Any] | None = None
        self._sock: zmq.Socket[Any] | None = None

    def _count(self, key: str, n: int = 1) -> None:
        self._stats[key] = self._stats.get(key, 0) + n

    def take_stats(self) -> dict[str, int]:
        stats, self._stats = self._stats, {}
        return stats

    def identity(self, rank: int) -> bytes:
        """What a message of `rank`'s shards is tagged with: the model and the split."""
        return f"{self.model_id}/tp{self.tp_size}/{rank}".encode()

    def shutdown(self) -> None:
        for receiver in self._receivers:
            receiver.close()
        self._receivers = []
        if self._sock is not None:
            self._sock.close(linger=0)
            self._sock = None

    # ---- scheduler side ---------------------------------------------------------------------

    def num_external_tokens(self, request: Any, num_computed: int) -> int:
        receivers = self._receivers
        if not receivers:
            return 0
        with contextlib.ExitStack() as stack:
            for receiver in receivers:
                stack.enter_context(receiver.lock)
            return loadable_tokens(
                request, num_computed, self.block_size, lambda h: all(h in r.blocks for r in receivers)
            )

    def on_blocks_allocated(self, request: Any, block_ids: list[int], num_external: int) -> None:
        hashes = block_hashes(request, self.block_size)
        if num_external > 0:
            start = request.num_computed_tokens // self.block_size
            pairs: list[tuple[int, list[bytes]]] = [
                (block_ids[i], []) for i in range(start, start + num_external // self.block_size)
            ]
            for receiver in self._receivers:
                with receiver.lock:
                    # A shard evicted since num_external_tokens is sent as b"": its load fails.
                    for (_, shards), i in zip(pairs, range(start, start + len(pairs)), strict=True):
                        shards.append(receiver.blocks.get(hashes[i], b""))
            self._loads[request.request_id] = [(b, tuple(shards)) for b, shards in pairs]
        elif self.produces:
            full = min(request.num_prompt_tokens // self.block_size, len(block_ids))
            self._sends += [(block_ids[i], hashes[i]) for i in range(full)]

    def build_step_meta(self) -> P2PStepMeta:
        meta = P2PStepMeta(self._loads, self._sends)
        self._loads, self._sends = {}, []
        return meta

    # ---- worker side ------------------------------------------------------------------------

    def register_kv_caches(self, caches: dict[str, torch.Tensor]) -> None:
        check_layout(caches, self.block_size, self.name)
        self._caches = caches

    def failed_loads(self) -> set[str]:
        return set(self._failed)

    def start_load(self, meta: P2PStepMeta) -> None:
        self._meta, self._failed, self._gathered = meta, set(), {}
        caches = list(self._caches.values())
        for req_id, pairs in meta.loads.items():
            for block_id, shards in pairs:
                layers = decode_block(shards[self.tp_rank], caches)
                if layers is None:
                    self._count("corrupt_blocks")
                    logger.warning(
                        "a received KV block for request %s is missing or corrupt; recomputing", req_id
                    )
                    self._failed.add(req_id)
                    break
                for cache, data in zip(caches, layers, strict=True):
                    cache[:, block_id].copy_(data, non_blocking=True)

    def _pending_sends(self) -> list[tuple[int, bytes]]:
        if self._meta is None:
            return []
        return [
            (b, h)
            for b, h in dict((h, (b, h)) for b, h in self._meta.sends).values()
            if h not in self._delivered
        ]

    def save_layer(self, layer_name: str, kv_cache: torch.Tensor, layout: BatchLayout) -> None:
        sends = self._pending_sends()
        if sends:
            self._gathered[layer_name] = gather_blocks(kv_cache, [b for b, _ in sends])

    def wait_save(self) -> None:
        sends = self._pending_sends()
        if not sends or not self._gathered:
            return
        layers = [self._gathered[name] for name in self._caches]
        self._gathered = {}
        frames = [self.identity(self.tp_rank)]
        for j, (_, h) in enumerate(sends):
            frames += [h, encode_block([layer[:, j] for layer in layers])]
        answer = self._send(frames)
        if answer == b"ok":
            for _, h in sends:
                self._delivered[h] = None
            while len(self._delivered) > _DELIVERED_MEMORY:
                self._delivered.popitem(last=False)
            self._count("tokens_saved", len(sends) * self.block_size)
            return
        self._count("save_failures", len(sends))
        why = "it answered " + answer.decode(errors="replace") if answer else "no answer"
        logger.warning(
            "could not send %d KV blocks to the decode instance %s (%s within %.1f s); it will compute them",
            len(sends),
            self.peer_address(),
            why,
            self.settings.send_timeout_s,
        )

    def peer_address(self) -> str:
        """host:port of the decode instance's listener for this rank (kv_peer's port + rank)."""
        assert self.settings.peer is not None
        host, _, port = self.settings.peer.rpartition(":")
        return f"{host}:{int(port) + self.tp_rank}"

    def _send(self, frames: list[bytes]) -> bytes | None:
        """Send one message and wait for the answer; None on a timeout (the socket is then
        replaced, dropping whatever it still queued)."""
        if self._sock is None:
            self._ctx = self._ctx or zmq.Context()
            self._sock = self._ctx.socket(zmq.DEALER)
            self._sock.setsockopt(zmq.LINGER, 0)
            self._sock.setsockopt(zmq.SNDTIMEO, int(self.settings.send_timeout_s * 1000))
            self._sock.connect(f"tcp://{self.peer_address()}")
        sock = self._sock
        try:
            sock.send_multipart(frames, copy=False)
            if sock.poll(int(self.settings.send_timeout_s * 1000), zmq.POLLIN):
                return bytes(sock.recv())
        except zmq.ZMQError:
            pass
        sock.close(linger=0)
        self._sock = None
        return None
