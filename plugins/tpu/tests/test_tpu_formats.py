"""Weights through the core's other loader paths, and the TPU's default dtype: dummy weights
(seeded, so the tpu and cpu devices build the same model) give the cpu plugin's greedy tokens;
bfloat16 runs with finite logprobs and a bfloat16 KV cache."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import numpy as np

from hallm import LLM, SamplingParams

LIMITS = dict(block_size=4, num_gpu_blocks_override=64, max_num_batched_tokens=16, max_num_seqs=4)
PROMPTS = [{"prompt_token_ids": list(range(3, 3 + n))} for n in (2, 9, 21)]


def test_dummy_weights_equal_the_cpu_plugin(tiny_model: Callable[[str], Path]) -> None:
    path = str(tiny_model("llama"))
    greedy = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)

    def run(device: str) -> list[list[int]]:
        llm = LLM(model=path, device=device, dtype="float32", load_format="dummy", seed=5, **LIMITS)
        return [o.outputs[0].token_ids for o in llm.generate(PROMPTS, greedy, use_tqdm=False)]

    assert run("tpu") == run("cpu")


def test_bfloat16(tiny_model: Callable[[str], Path]) -> None:
    # An 8-token step budget: two programs to compile (the prompts are prefilled in chunks).
    llm = LLM(
        model=str(tiny_model("qwen2")),
        device="tpu",
        dtype="bfloat16",
        **{**LIMITS, "max_num_batched_tokens": 8},
    )
    assert np.dtype(llm.engine.executor.worker.kv_cache.dtype).name == "bfloat16"
    outs = llm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=6, logprobs=1), use_tqdm=False)
    for out in outs:
        completion = out.outputs[0]
        assert len(completion.token_ids) == 6
        assert all(
            math.isfinite(lp[t].logprob)
            for t, lp in zip(completion.token_ids, completion.logprobs, strict=True)
        )
