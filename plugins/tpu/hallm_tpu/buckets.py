"""Static step shapes: token and request counts padded to a few buckets, each compiled once.

XLA compiles one program per input shape. A step of T tokens for R requests runs the program of
the smallest token bucket >= T and the smallest request bucket >= R (capped at the token bucket:
a request has at least one token), so the set of programs is fixed when the engine starts and is
compiled then (`TpuWorker.init_kv_cache`), never while a request waits.
"""

from __future__ import annotations

import bisect
import dataclasses

#: The smallest token bucket (decode steps of a few requests pad up to it).
MIN_TOKEN_BUCKET = 8
#: Request buckets grow by this factor (1, 4, 16, ...): the request count only sizes the rows
#: whose logits are computed, so coarse buckets waste little.
REQUEST_BUCKET_FACTOR = 4


def _geometric(limit: int, start: int, factor: int) -> list[int]:
    out = []
    size = min(start, limit)
    while size < limit:
        out.append(size)
        size *= factor
    out.append(limit)
    return out


@dataclasses.dataclass(frozen=True)
class Buckets:
    """token: ascending token buckets (the last is max_num_batched_tokens); request: ascending
    request buckets (the last is max_num_seqs)."""

    token: tuple[int, ...]
    request: tuple[int, ...]

    @classmethod
    def for_limits(cls, max_tokens: int, max_reqs: int) -> Buckets:
        return cls(
            token=tuple(_geometric(max_tokens, MIN_TOKEN_BUCKET, 2)),
            request=tuple(_geometric(min(max_reqs, max_tokens), 1, REQUEST_BUCKET_FACTOR)),
        )

    def pick(self, num_tokens: int, num_reqs: int) -> tuple[int, int]:
        """(token bucket, request bucket) of a step; ValueError past the largest."""
        if num_tokens > self.token[-1] or num_reqs > self.request[-1] or num_reqs > num_tokens:
            raise ValueError(
                f"a step of {num_tokens} tokens for {num_reqs} requests exceeds the compiled buckets "
                f"(up to {self.token[-1]} tokens, {self.request[-1]} requests)"
            )
        t = self.token[bisect.bisect_left(self.token, num_tokens)]
        r = self.request[bisect.bisect_left(self.request, num_reqs)]
        return t, min(r, t)

    def shapes(self) -> list[tuple[int, int]]:
        """Every (token, request) bucket pair a step can pick, smallest first."""
        return sorted({(t, min(r, t)) for t in self.token for r in self.request})
