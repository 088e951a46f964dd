"""Start-up warm-up: dummy requests through the real step path before the first user request.

Kernels compiled on first use (Triton's JIT, per shape specialisation) would otherwise be
compiled inside the first user requests, which then pay seconds of latency. The engine runs,
when its platform asks for it (`Platform.warm_up_at_start`), a few requests that reach every
kind of step the scheduler makes: a prefill chunk of the full token budget, short prefills
whose lengths are and are not multiples of 16 (Triton specialises integer arguments on that),
decode steps at a batch of several requests, and the sampler's greedy, top-k/top-p,
temperature-only and penalized paths. Step graphs are captured before this, so their kernels are
already built; where short steps replay graphs, a step is eager only past the largest graph, so
a full chunk also runs a token short, alone (the other divisibility class of the eager kernels).
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

from hallm.core.sampling_params import SamplingParams

if TYPE_CHECKING:
    from hallm.core.engine import LLMEngine

logger = logging.getLogger("hallm.engine")

_DECODE_STEPS = 3


def warm_up_prompts(
    max_num_batched_tokens: int, max_model_len: int, vocab_size: int, kv_tokens: int
) -> list[list[int]]:
    """The prompts of the warm-up: one as long as a full prefill chunk (short of the context
    limit and of half the KV pool), and short ones of 16 and 17 tokens."""
    longest = max(1, min(max_num_batched_tokens, max_model_len - _DECODE_STEPS - 1, kv_tokens // 2))
    lengths = [longest] + [n for n in (16, 17) if n < longest]
    token = min(100, vocab_size - 1)  # past the low ids, which are special in most vocabularies
    return [[token] * n for n in lengths]


def warm_up(engine: LLMEngine) -> float:
    """Run the warm-up requests to completion; return the seconds it took. The prefix cache is
    reset afterwards (and with it its statistics), so no user request reuses warm-up blocks."""
    config = engine.config
    prompts = warm_up_prompts(
        config.scheduler.max_num_batched_tokens,
        config.model.max_model_len,
        int(config.model.hf_config.vocab_size),
        engine.scheduler.kv.num_usable_blocks * config.cache.block_size,
    )
    greedy = SamplingParams(temperature=0.0, max_tokens=_DECODE_STEPS, ignore_eos=True, detokenize=False)
    sampled = SamplingParams(
        temperature=1.0, top_k=20, top_p=0.9, max_tokens=_DECODE_STEPS, ignore_eos=True, detokenize=False
    )
    # Steps whose rows use temperature alone go to the platform's one-pass sampler, given the
    # model's logits as they are or, after a penalty, in float32: each is a kernel of its own,
    # and a step samples one way for all its rows, so each runs in a batch of its own.
    plain = SamplingParams(temperature=1.0, max_tokens=_DECODE_STEPS, ignore_eos=True, detokenize=False)
    penalized = SamplingParams(
        temperature=1.0, repetition_penalty=1.1, max_tokens=_DECODE_STEPS, ignore_eos=True, detokenize=False
    )
    batches = [[(prompt, params) for prompt in prompts for params in (greedy, sampled)]]
    if len(prompts[0]) - 1 > len(prompts[-1]):
        token = prompts[0][0]
        other = token - 1 if token > 0 else 1  # another token: no prefix-cache hit on the full chunk
        batches.append([([other] * (len(prompts[0]) - 1), greedy)])
    batches += [[(prompts[-1], plain)], [(prompts[-1], penalized)]]
    start = time.perf_counter()
    for b, batch in enumerate(batches):
        for i, (prompt, params) in enumerate(batch):
            engine.add_request(f"hallm-warmup-{b}-{i}", {"prompt_token_ids": prompt}, params)
        while engine.has_unfinished_requests():
            engine.step()
    engine.reset_prefix_cache()
    elapsed = time.perf_counter() - start
    logger.info(
        "warm-up: %d dummy requests (prefills of %s tokens; greedy, top-k/top-p, temperature-only "
        "and penalized decode) in %.2f s",
        sum(len(batch) for batch in batches),
        "/".join(sorted({str(len(p)) for batch in batches for p, _ in batch}, key=int, reverse=True)),
        elapsed,
    )
    return elapsed
