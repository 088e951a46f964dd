"""`offload`: prompt KV blocks kept in host memory beyond the device pool, and loaded back on a
prefix hit instead of recomputing (the device pool evicts cached prefixes under pressure; the
host tier keeps them, up to a byte budget, least recently used first out).

Every full prompt block is written through to a host slot when its prompt is computed (a block
the host already holds is only marked recently used), so a prefix the device evicts later is
still on the host. The scheduler side owns the map block hash -> host slot (the worker side only
copies what it is told), so both sides agree without talking: the number of slots is the budget
over the bytes of one block of every layer (`CacheConfig.bytes_per_block`). A step's loads run
before its forward and its stores after it; a block stored in a step is loadable from the next.

With tensor parallelism the scheduler side still decides the slots, and each rank keeps its
shard of a block (its KV heads) in the same slot of its own host pool, so no rank ever tells
another anything. `cpu_bytes` is the budget of the whole instance, all ranks together (vLLM's
meaning): a block's bytes are those of one rank's shard times the number of ranks.

kv_connector_extra_config: cpu_bytes (the host budget in bytes, over all ranks; default 1 GiB).
"""

from __future__ import annotations

import dataclasses
from collections import OrderedDict
from typing import Any

import torch

from hallm.core.kv_connectors.blocks import (
    block_hashes,
    check_layout,
    load_blocks,
    loadable_tokens,
    store_blocks,
)
from hallm.platforms import BatchLayout, ConfigError, KVConnector, KVConnectorRole

DEFAULT_CPU_BYTES = 1 << 30


@dataclasses.dataclass
class OffloadStepMeta:
    loads: dict[str, list[tuple[int, int]]]  # request id -> [(device block id, host slot)]
    stores: list[tuple[int, int]]  # (device block id, host slot) to copy after the forward


def host_slots(config: Any, per_block: int | None = None) -> int:
    """Host slots the budget holds; `per_block`: one rank's bytes of one block over every layer
    (default: the engine's CacheConfig.bytes_per_block, the largest rank's)."""
    kv = config.kv_transfer
    extra = kv.kv_connector_extra_config if kv is not None else {}
    budget = extra.get("cpu_bytes", DEFAULT_CPU_BYTES)
    if isinstance(budget, bool) or not isinstance(budget, int) or budget <= 0:
        raise ConfigError(
            f"the offload KV connector's cpu_bytes must be a positive integer (bytes), got {budget!r}"
        )
    per_block = int(config.cache.bytes_per_block) if per_block is None else per_block
    if per_block <= 0:
        raise ConfigError(
            "the offload KV connector needs the engine's KV block size in bytes (CacheConfig.bytes_per_block)"
        )
    parallel = getattr(config, "parallel", None)
    per_block *= int(getattr(parallel, "tensor_parallel_size", 1))  # every rank's shard
    slots = budget // per_block
    if slots < 1:
        raise ConfigError(f"cpu_bytes={budget} holds no KV block of this model ({per_block} bytes); raise it")
    return int(slots)


class OffloadConnector(KVConnector):
    name = "offload"

    def __init__(self, config: Any, role: KVConnectorRole) -> None:
        super().__init__(config, role)
        kv = config.kv_transfer
        self.produces = kv is None or kv.is_producer
        self.consumes = kv is None or kv.is_consumer
        self.block_size = int(config.cache.block_size)
        self.num_slots = host_slots(config) if role == KVConnectorRole.SCHEDULER else 0
        # scheduler side: block hash -> host slot, least recently used first
        self._lru: OrderedDict[bytes, int] = OrderedDict()
        self._free_slots = list(range(self.num_slots - 1, -1, -1))
        self._storing: set[bytes] = set()  # stored this step: loadable from the next
        self._loads: dict[str, list[tuple[int, int]]] = {}
        self._stores: list[tuple[int, int]] = []
        self._stats: dict[str, int] = {}
        # worker side
        self._pool: dict[str, torch.Tensor] = {}
        self._caches: dict[str, torch.Tensor] = {}
        self._meta: OffloadStepMeta | None = None

    def _count(self, key: str, n: int = 1) -> None:
        self._stats[key] = self._stats.get(key, 0) + n

    def take_stats(self) -> dict[str, int]:
        stats, self._stats = self._stats, {}
        return stats

    # ---- scheduler side ---------------------------------------------------------------------

    def num_external_tokens(self, request: Any, num_computed: int) -> int:
        if not self.consumes:
            return 0
        return loadable_tokens(
            request, num_computed, self.block_size, lambda h: h in self._lru and h not in self._storing
        )

    def on_blocks_allocated(self, request: Any, block_ids: list[int], num_external: int) -> None:
        hashes = block_hashes(request, self.block_size)
        if num_external > 0:
            start = request.num_computed_tokens // self.block_size
            pairs = []
            for i in range(start, start + num_external // self.block_size):
                self._lru.move_to_end(hashes[i])
                pairs.append((block_ids[i], self._lru[hashes[i]]))
            self._loads[request.request_id] = pairs
            self._count("offload_hit_tokens", len(pairs) * self.block_size)
            return
        if not self.produces:
            return
        for i in range(min(request.num_prompt_tokens // self.block_size, len(block_ids))):
            h = hashes[i]
            if h in self._lru:
                self._lru.move_to_end(h)
                continue
            if self._free_slots:
                slot = self._free_slots.pop()
            else:
                _, slot = self._lru.popitem(last=False)
                self._count("offload_evicted_blocks")
            self._lru[h] = slot
            self._storing.add(h)
            self._stores.append((block_ids[i], slot))

    def build_step_meta(self) -> OffloadStepMeta:
        meta = OffloadStepMeta(self._loads, self._stores)
        self._loads, self._stores, self._storing = {}, [], set()
        return meta

    # ---- worker side ------------------------------------------------------------------------

    def register_kv_caches(self, caches: dict[str, torch.Tensor]) -> None:
        check_layout(caches, self.block_size, self.name)
        self._caches = caches
        # The scheduler side's count, from the tensors themselves (at least as many where this
        # rank's shard is smaller than the largest rank's, which the scheduler side counts).
        self.num_slots = host_slots(
            self.config, sum(c[:, 0].numel() * c.element_size() for c in caches.values())
        )
        pin = self.pin_host_memory and next(iter(caches.values())).device.type != "cpu"
        self._pool = {
            name: torch.empty((2, self.num_slots, *c.shape[2:]), dtype=c.dtype, device="cpu", pin_memory=pin)
            for name, c in caches.items()
        }

    def start_load(self, meta: OffloadStepMeta) -> None:
        self._meta = meta
        pairs = [p for req in meta.loads.values() for p in req]
        if not pairs:
            return
        slots = [s for _, s in pairs]
        dst = torch.tensor(
            [b for b, _ in pairs], dtype=torch.long, device=next(iter(self._caches.values())).device
        )
        for name, cache in self._caches.items():
            load_blocks(self._pool[name], slots, cache, dst)

    def save_layer(self, layer_name: str, kv_cache: torch.Tensor, layout: BatchLayout) -> None:
        if self._meta is None or not self._meta.stores:
            return
        stores = self._meta.stores
        src = torch.tensor([b for b, _ in stores], dtype=torch.long, device=kv_cache.device)
        store_blocks(kv_cache, src, self._pool[layer_name], [s for _, s in stores])

    def wait_save(self) -> None:
        if self._meta is not None and self._meta.stores:
            self._count("tokens_saved", len(self._meta.stores) * self.block_size)
