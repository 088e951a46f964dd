"""A pool of KV-cache blocks with reference counts and a prefix cache.

Free blocks wait in least-recently-freed order; a free block that still holds a cached prefix
keeps its hash until it is taken for new content (evicted). A freed block that holds nothing
findable (a partial block, a duplicate, caching off) goes to the head of the queue instead, so
it is taken before any cached prefix. Every operation is O(1) per block: the free queue is an
OrderedDict (a hash map over a doubly linked list).
"""

from __future__ import annotations

import dataclasses
from collections import OrderedDict
from collections.abc import Iterable, Sequence


@dataclasses.dataclass
class KVBlock:
    block_id: int
    ref_cnt: int = 0
    block_hash: bytes | None = None


@dataclasses.dataclass
class PrefixCacheStats:
    """Counted once per request at its first admission (a resume after preemption is no new query)."""

    queries: int = 0  # prompt tokens looked up
    hits: int = 0  # prompt tokens found in the cache
    requests: int = 0  # requests looked up
    tokens_saved: int = 0  # tokens not computed thanks to the cache, resumes included
    evictions: int = 0  # cached blocks taken for new content

    @property
    def hit_rate(self) -> float:
        return self.hits / self.queries if self.queries else 0.0


class BlockPool:
    """`num_blocks` blocks; block 0 is the null block (padding in block tables), never handed out."""

    NULL_BLOCK_ID = 0

    def __init__(self, num_blocks: int, enable_caching: bool) -> None:
        if num_blocks < 2:
            raise ValueError(f"the KV pool needs at least 2 blocks (one is reserved), got {num_blocks}")
        self.num_blocks = num_blocks
        self.enable_caching = enable_caching
        self.blocks = [KVBlock(i) for i in range(num_blocks)]
        self.blocks[0].ref_cnt = 1  # the null block is permanently referenced
        self._free: OrderedDict[int, None] = OrderedDict((i, None) for i in range(1, num_blocks))
        self._cached: dict[bytes, KVBlock] = {}
        self.stats = PrefixCacheStats()

    @property
    def num_free_blocks(self) -> int:
        """Blocks that can be handed out now (free, possibly holding an evictable cached prefix)."""
        return len(self._free)

    @property
    def num_usable_blocks(self) -> int:
        return self.num_blocks - 1

    def usage(self) -> float:
        return 1.0 - self.num_free_blocks / self.num_usable_blocks

    def lookup(self, block_hash: bytes) -> KVBlock | None:
        return self._cached.get(block_hash)

    def allocate(self, n: int) -> list[KVBlock]:
        """Take `n` free blocks (least recently freed first), evicting their cached prefixes."""
        if n > len(self._free):
            raise RuntimeError(
                f"asked for {n} blocks with {len(self._free)} free; check num_free_blocks first"
            )
        out = []
        for _ in range(n):
            block_id, _ = self._free.popitem(last=False)
            block = self.blocks[block_id]
            if block.block_hash is not None:
                if self._cached.get(block.block_hash) is block:
                    del self._cached[block.block_hash]
                    self.stats.evictions += 1
                block.block_hash = None
            block.ref_cnt = 1
            out.append(block)
        return out

    def touch(self, blocks: Iterable[KVBlock]) -> None:
        """Take a reference to cached blocks (a prefix hit), removing free ones from the queue."""
        for block in blocks:
            if block.ref_cnt == 0:
                del self._free[block.block_id]
            block.ref_cnt += 1

    def free(self, blocks: Sequence[KVBlock]) -> None:
        """Drop one reference to each block; blocks that reach zero join the free queue's tail
        (or its head when they hold no findable prefix).

        Callers pass a request's blocks in reverse order, so its last blocks (the least likely
        to be shared) are evicted first.
        """
        for block in blocks:
            if block.ref_cnt <= 0:
                raise RuntimeError(f"block {block.block_id} freed more often than taken")
            block.ref_cnt -= 1
            if block.ref_cnt == 0:
                self._free[block.block_id] = None
                if block.block_hash is None or self._cached.get(block.block_hash) is not block:
                    block.block_hash = None
                    self._free.move_to_end(block.block_id, last=False)

    def cache_block(self, block: KVBlock, block_hash: bytes) -> None:
        """Make a full block findable by its hash (first writer wins on a duplicate)."""
        if not self.enable_caching or block.block_hash is not None:
            return
        block.block_hash = block_hash
        self._cached.setdefault(block_hash, block)

    def reset_prefix_cache(self) -> None:
        """Forget every cached prefix (blocks in use keep their content, but are not findable)."""
        for block in self._cached.values():
            block.block_hash = None
        self._cached.clear()
        self.stats = PrefixCacheStats()
