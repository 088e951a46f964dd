"""The KV connector round trip (L2): save a prompt's KV through one engine's connector pair,
load it into another engine's cache through a second pair, compare the blocks bit for bit.

The flow follows the contract (hallm.platforms.kv_connector) step by step, as the engine drives
it: per side, a scheduler-side instance decides and a worker-side instance next to the KV cache
moves the bytes; every step runs build_step_meta -> start_load -> wait_layer_load (each layer)
-> save_layer (each layer, when the step computed tokens) -> wait_save -> failed_loads ->
finished -> take_stats. What is checked, each failure naming the step that broke:

- the save: the prompt's blocks leave the producer (a core connector reports them saved);
- the offer: a fresh scheduler side offers the saved full blocks (a core connector: exactly the
  full blocks short of the prompt's last token, which the engine always computes);
- the load: every offered position holds, bit for bit, what the producer saved, and no block
  outside the ones the load was given changed;
- a local prefix-cache hit: the offer and the load start past it, and leave its block alone;
- prompts never saved: a prompt whose first block differs gets nothing offered, even past a
  local hit on its own first block (a block's KV depends on every earlier token);
- the faults a core connector can meet (connector_setups.py: a deleted or truncated block file,
  a dead or evicting peer, a full host tier): a failed load is reported as failed, never
  as a success over wrong data, and a failed save costs the save, never an exception.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, NoReturn

import numpy as np
import pytest
import torch

from hallm.conformance.e2e import ENGINE_SETTINGS
from hallm.conformance.kernels import torch_dtype
from hallm.ops.testing import layout_tensors
from hallm.platforms import BatchLayout, KVConnector, KVConnectorRole

if TYPE_CHECKING:
    from hallm.conformance.connector_setups import ConnectorSetup
    from hallm.conformance.target import Target

LAYERS = ("layers.0.attn", "layers.1.attn")
SRC_BLOCKS = [5, 2, 9, 7]  # the producer's block table for the prompt
DST_BLOCKS = [11, 3, 14, 6]  # the consumer's, for the first load
HIT_BLOCKS = [12, 4, 15, 8]  # the consumer's, for the load past a local hit on block 12
NUM_BLOCKS, NUM_KV_HEADS = 16, 2
SEND_DEADLINE_S = 30.0


@dataclasses.dataclass
class StepResult:
    """What the worker side reported after one step."""

    failed: set[str]
    sent: set[str]
    received: set[str]
    stats: dict[str, int]


@dataclasses.dataclass
class Side:
    """One engine's connector pair and KV cache ({layer: [2, NUM_BLOCKS, block_size, heads, head_size]})."""

    label: str
    scheduler: KVConnector
    worker: KVConnector
    caches: dict[str, torch.Tensor]

    def step(self, layout: BatchLayout | None) -> StepResult:
        """One engine step's connector calls, in the engine's order (a load-only step: no layout)."""
        meta = self.scheduler.build_step_meta()
        self.worker.start_load(meta)
        for name in self.caches:
            self.worker.wait_layer_load(name)
        if layout is not None:
            for name, cache in self.caches.items():
                self.worker.save_layer(name, cache, layout)
        self.worker.wait_save()
        failed = set(self.worker.failed_loads())
        sent, received = self.worker.finished()
        stats = dict(self.worker.take_stats())
        for key, value in self.scheduler.take_stats().items():
            stats[key] = stats.get(key, 0) + value
        return StepResult(failed, set(sent), set(received), stats)

    def shutdown(self) -> None:
        self.scheduler.shutdown()
        self.worker.shutdown()


class RoundTrip:
    """The round trip of one connector on one device; `run()` fails the test naming what broke."""

    def __init__(
        self,
        target: Target,
        setup: ConnectorSetup,
        model_dir: str,
        dtype: str,
        head_size: int,
        block_size: int,
    ) -> None:
        self.target, self.setup = target, setup
        self.model_dir, self.dtype, self.head_size, self.block_size = model_dir, dtype, head_size, block_size
        self.device = target.platform().device(0)
        self.shape = (2, NUM_BLOCKS, block_size, NUM_KV_HEADS, head_size)
        gen = torch.Generator().manual_seed(0)
        self.src = {
            n: torch.randn(self.shape, generator=gen).to(self.device, torch_dtype(dtype)) for n in LAYERS
        }
        for cache in self.src.values():  # blocks a load may fill when the producer is the consumer
            cache[:, DST_BLOCKS + HIT_BLOCKS] = float("nan")
        self.prompt = list(range(3, 3 + 3 * block_size + 5))  # 3 full blocks and a partial one
        self.vocab = 0
        self.sides: list[Side] = []
        self.producer: Side | None = None
        self.consumer: Side | None = None
        self._ids = 0

    # ---- helpers for the checks and the fault scenarios --------------------------------------

    def fail(self, what: str) -> NoReturn:
        pytest.fail(f"KV connector '{self.setup.name}' of {self.setup.origin}: {what}", pytrace=False)

    def engine_config(self, kv_transfer_config: dict[str, Any] | None) -> Any:
        from hallm.core.engine_args import EngineArgs

        config = EngineArgs(
            model=self.model_dir,
            device=self.target.device_id,
            dtype=self.dtype,
            block_size=self.block_size,
            kv_transfer_config=kv_transfer_config,
            **ENGINE_SETTINGS,
        ).create_engine_config()
        # What the engine learns once the cache is allocated: one block's bytes over every layer.
        config.cache.bytes_per_block = self.bytes_per_block()
        self.vocab = int(config.model.hf_config.vocab_size)
        return config

    def bytes_per_block(self) -> int:
        return sum(c[:, 0].numel() * c.element_size() for c in self.src.values())

    def side(
        self, label: str, kv_transfer_config: dict[str, Any] | None, caches: dict[str, torch.Tensor]
    ) -> Side:
        """A new engine's connector pair, the worker side holding `caches`."""
        config = self.engine_config(kv_transfer_config)
        cls = self.setup.cls
        try:
            scheduler = cls(config, KVConnectorRole.SCHEDULER)
            worker = cls(config, KVConnectorRole.WORKER)
            worker.register_kv_caches(caches)
        except Exception as e:
            self.fail(f"building the {label}'s connector pair and registering its KV cache raised {e!r}")
        side = Side(label, scheduler, worker, caches)
        self.sides.append(side)
        return side

    def empty_caches(self) -> dict[str, torch.Tensor]:
        return {
            n: torch.full(self.shape, float("nan"), dtype=torch_dtype(self.dtype), device=self.device)
            for n in LAYERS
        }

    def request(self, prompt: list[int], num_computed: int = 0) -> Any:
        """A fresh engine request (a new id each time, as another engine would make)."""
        from hallm.core.request import Request
        from hallm.core.sampling_params import SamplingParams

        self._ids += 1
        req = Request(f"kv-roundtrip-{self._ids}", prompt, SamplingParams(max_tokens=1), frozenset(), 256)
        req.num_computed_tokens = num_computed
        return req

    def other_prompt(self) -> list[int]:
        """The prompt with its first token changed: every block's KV differs (it depends on the
        first token), although blocks 1 and 2 hold the same tokens."""
        first = self.prompt[0] + 1 if self.prompt[0] + 1 < self.vocab else 1
        return [first, *self.prompt[1:]]

    def save(self, side: Side, prompt: list[int]) -> StepResult:
        """The producer computes `prompt` into SRC_BLOCKS in one step and saves it; a connector
        that holds the blocks (on_request_finished) must report the send within 30 s."""
        req = self.request(prompt)
        offered = side.scheduler.num_external_tokens(req, 0)
        if not isinstance(offered, int) or offered < 0:
            self.fail(
                f"num_external_tokens() returned {offered!r} on the {side.label} (an int >= 0 expected)"
            )
        side.scheduler.on_blocks_allocated(req, SRC_BLOCKS, 0)
        result = side.step(prefill_layout(len(prompt), self.block_size, self.device))
        if side.scheduler.on_request_finished(req, SRC_BLOCKS):
            deadline = time.monotonic() + SEND_DEADLINE_S
            while req.request_id not in result.sent:
                if time.monotonic() > deadline:
                    self.fail(
                        "on_request_finished() asked to hold the blocks until the save completes, but no "
                        f"later step's finished() named the request within {SEND_DEADLINE_S:.0f} s: the engine "
                        "would hold its blocks forever"
                    )
                time.sleep(0.01)
                result = side.step(None)
        return result

    def offer(self, side: Side, req: Any) -> int:
        n = side.scheduler.num_external_tokens(req, req.num_computed_tokens)
        if not isinstance(n, int) or n < 0:
            self.fail(f"num_external_tokens() returned {n!r} (an int >= 0 expected)")
        return n

    def load(
        self,
        side: Side,
        req: Any,
        block_ids: list[int],
        n: int,
        before_load: Callable[[], None] | None = None,
    ) -> tuple[StepResult, dict[str, torch.Tensor]]:
        """A load step of `n` tokens from req.num_computed_tokens into `block_ids`; returns the
        step's result and the caches as they were before it (host copies)."""
        side.scheduler.on_blocks_allocated(req, block_ids, n)
        if before_load is not None:
            before_load()
        before = {name: c.cpu().clone() for name, c in side.caches.items()}
        result = side.step(None)
        self.target.platform().synchronize()
        return result, before

    # ---- the round trip ----------------------------------------------------------------------

    def run(self) -> None:
        setup, bs = self.setup, self.block_size
        if setup.same_engine:
            self.producer = self.consumer = self.side("engine", setup.producer_kv(self), self.src)
        else:
            # The consumer first: it may be the one that listens (p2p).
            self.consumer = self.side("consumer", setup.consumer_kv(self), self.empty_caches())
            self.producer = self.side("producer", setup.producer_kv(self), self.src)
        saved = self.save(self.producer, self.prompt)
        full = 3 * bs  # the full blocks short of the last token: what a core connector offers
        lost = saved.stats.get("save_failures", 0) or saved.stats.get("tokens_saved", 0) != full
        if setup.core and lost:
            self.fail(
                f"saving the prompt's 3 full blocks from the device reported {saved.stats} "
                f"(tokens_saved={full} and no save_failures expected): the device's KV cache did not "
                "reach the connector's store"
            )
        self.check_load()
        self.check_past_local_hit(full)
        self.check_unsaved_prompts()
        for fault in setup.faults:
            fault(self)

    def check_load(self) -> None:
        assert self.consumer is not None
        bs, req = self.block_size, self.request(self.prompt)
        n = self.offer(self.consumer, req)
        if n < bs or n > len(self.prompt) - 1:
            self.fail(
                f"after saving a {len(self.prompt)}-token prompt ({len(self.prompt) // bs} full blocks of "
                f"{bs}), a fresh scheduler side offers {n} loadable tokens; expected at least one block and "
                "at most the prompt less its last token (the engine always computes the last one)"
            )
        if self.setup.core and n != 3 * bs:
            self.fail(
                f"offers {n} tokens of the saved prompt; its 3 full blocks short of the last token are {3 * bs}"
            )
        result, before = self.load(self.consumer, req, DST_BLOCKS, n)
        if req.request_id in result.failed:
            self.fail(
                f"the load of {n} saved tokens reported itself failed (failed_loads()) on an intact store"
            )
        self.check_positions(DST_BLOCKS, 0, n, before, "the load")

    def check_past_local_hit(self, full: int) -> None:
        """Block 0 is already in the consumer's device cache (a local prefix-cache hit)."""
        assert self.consumer is not None
        bs, req = self.block_size, self.request(self.prompt, num_computed=self.block_size)
        n = self.offer(self.consumer, req)
        if n + bs > len(self.prompt) - 1:
            self.fail(
                f"with the first {bs} tokens a local prefix-cache hit, offers {n} more tokens: past the prompt's "
                "last token (num_external_tokens counts from num_computed)"
            )
        if self.setup.core and n != full - bs:
            self.fail(f"with the first {bs} tokens a local hit, offers {n} tokens; expected {full - bs}")
        if n == 0:
            return
        result, before = self.load(self.consumer, req, HIT_BLOCKS, n)
        if req.request_id in result.failed:
            self.fail("the load past a local prefix-cache hit reported itself failed on an intact store")
        self.check_positions(HIT_BLOCKS, bs, n, before, "the load past a local prefix-cache hit")

    def check_unsaved_prompts(self) -> None:
        assert self.consumer is not None
        other = self.other_prompt()
        for computed in (0, self.block_size):
            req = self.request(other, num_computed=computed)
            n = self.offer(self.consumer, req)
            if n:
                hit = " past a local hit on its own first block" if computed else ""
                self.fail(
                    f"offers {n} tokens{hit} for a prompt that was never saved (the saved prompt with its first "
                    "token changed). A block's KV depends on every token before it: key blocks by the whole "
                    "prefix (the engine's block hashes chain it), never by the block's own tokens"
                )

    def check_positions(
        self, block_ids: list[int], start: int, n: int, before: dict[str, torch.Tensor], what: str
    ) -> None:
        """Blocks outside those the load was given for positions [start, start + n) are as they
        were; those positions hold the producer's KV bit for bit."""
        assert self.consumer is not None
        bs = self.block_size
        loaded = set(block_ids[start // bs : -(-(start + n) // bs)])
        for layer in LAYERS:
            got = self.consumer.caches[layer].cpu()
            # What the producer saved (one engine: its cache before the load, same tensors).
            saved = before[layer] if self.consumer is self.producer else self.src[layer].cpu()
            for b in range(NUM_BLOCKS):
                if b not in loaded and not same_bits(got[:, b], before[layer][:, b]):
                    why = (
                        " (the local prefix-cache hit: the load must start at num_computed_tokens)"
                        if start and b == block_ids[0]
                        else ""
                    )
                    self.fail(f"{what} changed block {b} of layer {layer}, which it was not given{why}")
            for p in range(start, start + n):
                s_blk, d_blk, off = SRC_BLOCKS[p // bs], block_ids[p // bs], p % bs
                if not same_bits(saved[:, s_blk, off], got[:, d_blk, off]):
                    kv = "keys" if not same_bits(saved[0, s_blk, off], got[0, d_blk, off]) else "values"
                    self.fail(
                        f"after {what}, layer {layer} position {p} (block {d_blk} offset {off}) does not hold, bit "
                        f"for bit, the {kv} saved from the producer's block {s_blk} offset {off}"
                        + stray_hint(got[:, d_blk, off], saved, bs)
                    )

    def shutdown(self) -> None:
        for side in self.sides:
            side.shutdown()


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bitwise equality (NaN and -0.0 included)."""
    return a.shape == b.shape and torch.equal(
        a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8)
    )


def stray_hint(got: torch.Tensor, src: torch.Tensor, block_size: int) -> str:
    """Where the wrong data came from, if it is some other saved position (an index mix-up)."""
    if torch.isnan(got.float()).all():
        return "; it was never written (still NaN)"
    for blk in SRC_BLOCKS:
        for off in range(block_size):
            if same_bits(src[:, blk, off], got):
                return f"; it holds the producer's block {blk} offset {off} instead (an index mix-up)"
    return ""


def prefill_layout(num_tokens: int, block_size: int, device: torch.device) -> BatchLayout:
    """The step that computes the whole prompt into SRC_BLOCKS."""
    table = np.zeros((1, len(SRC_BLOCKS) + 1), dtype=np.int32)
    table[0, : len(SRC_BLOCKS)] = SRC_BLOCKS
    slots = [SRC_BLOCKS[p // block_size] * block_size + p % block_size for p in range(num_tokens)]
    layout = BatchLayout(
        num_reqs=1,
        num_tokens=num_tokens,
        num_prefill_reqs=1,
        max_query_len=num_tokens,
        max_seq_len=num_tokens,
        query_start_loc=np.asarray([0, num_tokens], dtype=np.int32),
        seq_lens=np.asarray([num_tokens], dtype=np.int32),
        context_lens=np.zeros(1, dtype=np.int32),
        block_tables=table,
        slot_mapping=np.asarray(slots, dtype=np.int64),
        block_size=block_size,
    )
    layout.tensors = layout_tensors(layout, device)
    return layout


def round_trip(
    target: Target, setup: ConnectorSetup, model_dir: str, dtype: str, head_size: int, block_size: int
) -> None:
    trip = RoundTrip(target, setup, model_dir, dtype, head_size, block_size)
    try:
        trip.run()
    finally:
        trip.shutdown()
