"""The start-up warm-up (`Platform.warm_up_at_start`): dummy requests run through the real step
path and leave nothing behind: no request, no used or cached block, no prefix-cache statistics,
and the same outputs as an engine that did not warm up."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from hallm.core.sampling_params import SamplingParams
from hallm.core.warmup import warm_up_prompts
from hallm.entrypoints.llm import LLM
from hallm.ops import reference_ops


def test_warm_up_prompts_cover_a_full_chunk_and_both_divisibilities() -> None:
    assert [len(p) for p in warm_up_prompts(2048, 8192, 32000, 10**6)] == [2048, 16, 17]
    # Short of the context limit (room for the decode steps) and of half the KV pool.
    assert [len(p) for p in warm_up_prompts(2048, 64, 32000, 10**6)] == [60, 16, 17]
    assert [len(p) for p in warm_up_prompts(2048, 8192, 32000, 40)] == [20, 16, 17]
    assert all(t < 50 for p in warm_up_prompts(64, 64, 50, 10**6) for t in p)


def test_engine_warms_up_when_the_platform_asks(
    tiny_model_dir: Callable[[str], Path], monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from hallm_cpu.platform import CpuPlatform

    model = str(tiny_model_dir("llama"))
    kwargs = {"device": "cpu", "dtype": "float32", "max_model_len": 64, "block_size": 4}
    prompts = [{"prompt_token_ids": [5, 6, 7, 8, 9]}, {"prompt_token_ids": list(range(20, 37))}]
    params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
    cold = [o.outputs[0].token_ids for o in LLM(model, **kwargs).generate(prompts, params, use_tqdm=False)]

    monkeypatch.setattr(CpuPlatform, "warm_up_at_start", lambda self: True)
    # A platform with a one-pass temperature sampler: the warm-up reaches it as the model's
    # logits and as penalized float32 logits, one decode request each.
    drawn: list[torch.Tensor] = []

    def temperature_sample(logits: torch.Tensor, temperature: torch.Tensor, seed: int) -> torch.Tensor:
        drawn.append(logits)
        return reference_ops.temperature_sample(logits, temperature, seed)

    table = CpuPlatform.op_table
    monkeypatch.setattr(
        CpuPlatform,
        "op_table",
        lambda self: dataclasses.replace(table(self), temperature_sample=temperature_sample),
    )
    from hallm.core.model_runner import ModelRunner

    step_tokens: list[int] = []
    forward = ModelRunner.forward

    def counted(self, layout, input_ids, positions):  # type: ignore[no-untyped-def]
        step_tokens.append(layout.num_tokens)
        return forward(self, layout, input_ids, positions)

    monkeypatch.setattr(ModelRunner, "forward", counted)
    with caplog.at_level(logging.INFO, logger="hallm.engine"):
        llm = LLM(model, **kwargs)
    assert 59 in step_tokens  # the full chunk a token short ran whole (no prefix-cache hit)
    # 3 prompts x 2 samplings, the longest a token short alone, temperature-only, penalized
    assert any(
        "warm-up: 9 dummy requests (prefills of 60/59/17/16 tokens" in r.getMessage() for r in caplog.records
    )
    assert len(drawn) == 6  # 3 tokens each of the temperature-only and the penalized request
    engine = llm.engine
    stats = engine.get_stats()
    assert not engine.has_unfinished_requests() and not engine.output_processor.parents
    assert stats["num_free_blocks"] == engine.scheduler.kv.num_usable_blocks
    assert stats["prefix_cache_queries"] == 0 and stats["prefix_cache_hits"] == 0
    warm = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
    assert warm == cold
