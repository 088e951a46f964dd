"""Per-request block tables on top of the block pool, with prefix-cache admission."""

from __future__ import annotations

from hallm.core.kv_cache.block_pool import BlockPool, KVBlock, PrefixCacheStats
from hallm.core.kv_cache.hashing import extend_block_hashes
from hallm.core.request import Request


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


class KVCacheManager:
    def __init__(self, num_blocks: int, block_size: int, enable_caching: bool) -> None:
        self.block_size = block_size
        self.enable_caching = enable_caching
        self.pool = BlockPool(num_blocks, enable_caching)
        self.req_blocks: dict[str, list[KVBlock]] = {}
        self.num_hashed_blocks: dict[str, int] = {}  # per request: blocks already made findable

    @property
    def num_free_blocks(self) -> int:
        return self.pool.num_free_blocks

    @property
    def num_blocks(self) -> int:
        """Blocks in the pool, the null block included."""
        return self.pool.num_blocks

    @property
    def num_usable_blocks(self) -> int:
        """Blocks a request can be given (all but the null block)."""
        return self.pool.num_usable_blocks

    @property
    def usage(self) -> float:
        """Fraction of the usable blocks held by requests."""
        return self.pool.usage()

    @property
    def prefix_cache_stats(self) -> PrefixCacheStats:
        return self.pool.stats

    def blocks_needed(self, num_tokens: int) -> int:
        return cdiv(num_tokens, self.block_size)

    def block_ids(self, request_id: str) -> list[int]:
        return [b.block_id for b in self.req_blocks.get(request_id, ())]

    def get_computed_blocks(self, request: Request) -> tuple[list[KVBlock], int]:
        """The longest cached prefix of a request being admitted: (blocks, tokens they hold).

        At least one token is always left to compute, so the step produces logits to sample.
        A request that wants prompt logprobs reads nothing from the cache (its prompt must be
        computed to score it), though its blocks are cached for others. Statistics are counted
        by `allocate_slots` when the admission succeeds, so a retry is not a second query.
        """
        if not self.enable_caching or request.sampling_params.prompt_logprobs is not None:
            return [], 0
        extend_block_hashes(
            request.block_hashes, request.all_token_ids, self.block_size, extra_keys=request.extra_keys
        )
        max_blocks = (request.num_tokens - 1) // self.block_size
        hits: list[KVBlock] = []
        for block_hash in request.block_hashes[:max_blocks]:
            block = self.pool.lookup(block_hash)
            if block is None:
                break
            hits.append(block)
        return hits, len(hits) * self.block_size

    def allocate_slots(
        self,
        request: Request,
        num_new_tokens: int,
        computed_blocks: list[KVBlock] | None = None,
        defer_caching: bool = False,
    ) -> list[int] | None:
        """Make room for `num_new_tokens` more tokens; return the new block ids, or None if full.

        `computed_blocks` are prefix-cache hits of a request being admitted; they are taken
        (referenced) here, together with the new blocks, or not at all. `defer_caching`: the new
        tokens' KV is loaded from outside, not computed this step; their blocks become findable
        only once the load succeeds (`cache_blocks`).
        """
        blocks = self.req_blocks.get(request.request_id)
        if not computed_blocks and blocks is not None:
            # The common decode step: the tokens fit the blocks held, and no block becomes full
            # of known tokens (nothing to hash). The general path below would do nothing either.
            total = request.num_computed_tokens + num_new_tokens
            if total <= len(blocks) * self.block_size and (
                not self.enable_caching
                or min(total, request.num_tokens) // self.block_size
                <= self.num_hashed_blocks.get(request.request_id, 0)
            ):
                return []
        computed_blocks = computed_blocks or []
        admitting = blocks is None
        num_held = 0 if blocks is None else len(blocks)
        num_computed = request.num_computed_tokens + len(computed_blocks) * self.block_size
        total = num_computed + num_new_tokens
        num_new_blocks = max(0, self.blocks_needed(total) - num_held - len(computed_blocks))
        # Hit blocks that sit in the free queue are about to leave it, so they do not count.
        evictable_hits = sum(1 for b in computed_blocks if b.ref_cnt == 0)
        if num_new_blocks > self.pool.num_free_blocks - evictable_hits:
            return None
        self.pool.touch(computed_blocks)
        new_blocks = self.pool.allocate(num_new_blocks)
        if blocks is None:
            blocks = self.req_blocks[request.request_id] = []
        blocks += computed_blocks  # in place: a step costs O(new blocks), not O(the table)
        blocks += new_blocks
        if self.enable_caching:
            if admitting:
                self._record_admission(request, len(computed_blocks) * self.block_size)
            if defer_caching:
                self.num_hashed_blocks.setdefault(request.request_id, num_computed // self.block_size)
                return [b.block_id for b in computed_blocks + new_blocks]
            # Blocks full after this step are hashed now: their content is written this step, and
            # a backend writes a step's KV before any attention reads it. Only blocks whose tokens
            # are all computed by the end of this step (`total`) are hashed, so no request can
            # hit a block that a chunk of this step does not reach.
            self._cache_full_blocks(request, blocks, min(total, request.num_tokens))
        return [b.block_id for b in computed_blocks + new_blocks]

    def _cache_full_blocks(self, request: Request, blocks: list[KVBlock], known: int) -> None:
        """Make the request's blocks that are full of its first `known` tokens findable."""
        extend_block_hashes(
            request.block_hashes,
            request.all_token_ids,
            self.block_size,
            known,
            extra_keys=request.extra_keys,
        )
        start = self.num_hashed_blocks.get(request.request_id, 0)
        for i in range(start, known // self.block_size):
            self.pool.cache_block(blocks[i], request.block_hashes[i])
        self.num_hashed_blocks[request.request_id] = max(start, known // self.block_size)

    def holds_blocks(self, request: Request) -> bool:
        return request.request_id in self.req_blocks

    def cache_blocks(self, request: Request, num_tokens: int) -> None:
        """After a load from outside: the blocks full of the first `num_tokens` tokens become
        prefix-cache blocks, as if computed here."""
        if self.enable_caching:
            self._cache_full_blocks(
                request, self.req_blocks[request.request_id], min(num_tokens, request.num_tokens)
            )

    def _record_admission(self, request: Request, num_hit_tokens: int) -> None:
        stats = self.pool.stats
        stats.tokens_saved += num_hit_tokens
        if request.num_preemptions == 0 and request.sampling_params.prompt_logprobs is None:
            # A resumed request's lookup is not a new query; a prompt-logprobs one made none.
            stats.requests += 1
            stats.queries += request.num_prompt_tokens
            stats.hits += num_hit_tokens

    def free(self, request: Request) -> None:
        blocks = self.req_blocks.pop(request.request_id, [])
        self.num_hashed_blocks.pop(request.request_id, None)
        self.pool.free(blocks[::-1])

    def reset_prefix_cache(self) -> bool:
        self.pool.reset_prefix_cache()
        return True
