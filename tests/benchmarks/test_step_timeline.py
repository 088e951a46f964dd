"""The engine's debug step trace (`LLMEngine` at `hallm --log-level debug`) and
benchmarks/step_timeline.py, which reads it: every request added and every step scheduled is a
line, and the summary counts them as the engine ran them."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import pytest

from benchmarks.step_timeline import last_run, parse, summarize
from hallm.core.sampling_params import SamplingParams
from hallm.entrypoints.llm import LLM


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_engine_debug_trace_is_the_step_timeline(
    tiny_model_dir: Callable[[str], Path], caplog: pytest.LogCaptureFixture, async_scheduling: bool
) -> None:
    llm = LLM(
        model=str(tiny_model_dir("llama")),
        device="cpu",
        dtype="float32",
        block_size=4,
        num_gpu_blocks_override=64,
        max_num_batched_tokens=16,
        async_scheduling=async_scheduling,
    )
    # 3 prompts of 10 tokens in a 16-token step budget: prompt chunks over two steps, then decode
    prompts = [{"prompt_token_ids": [5 + i] * 10} for i in range(3)]
    params = SamplingParams(max_tokens=4, ignore_eos=True, temperature=0.0)
    with caplog.at_level(logging.DEBUG, logger="hallm.engine"):
        llm.generate(prompts, params, use_tqdm=False)
    tl = last_run(parse(caplog.text), 3)
    assert len(tl.adds) == 3 and tl.adds == sorted(tl.adds)
    assert sum(s.prompt for s in tl.steps) == 30  # every prompt token once, in chunks
    assert (tl.steps[0].tokens, tl.steps[0].rows, tl.steps[0].waiting) == (16, 2, 1)
    assert all(s.tokens <= 16 for s in tl.steps)
    # the first request decodes beside the others' last chunks, then all three decode together
    decode = [s for s in tl.steps if s.prompt == 0]
    assert len(decode) >= 2 and decode[0].rows == 3 and all(s.tokens == s.rows for s in decode)
    summary = summarize(tl)
    assert summary["requests"] == 3 and summary["steps"] == len(tl.steps)
    assert summary["prompt_steps"] + summary["decode_steps"] == len(tl.steps) - 1


def test_summary_of_a_known_timeline() -> None:
    log = "\n".join(
        [
            "DEBUG hallm.engine: add t=10.000000 id=old prompt=4",
            "DEBUG hallm.engine: step t=10.001000 tokens=4 prompt=4 rows=1 waiting=0",
            "DEBUG hallm.engine: add t=20.000000 id=a prompt=8",
            "DEBUG hallm.engine: step t=20.001000 tokens=8 prompt=8 rows=1 waiting=0",
            "DEBUG hallm.engine: add t=20.002000 id=b prompt=8",
            "DEBUG hallm.engine: step t=20.011000 tokens=9 prompt=8 rows=2 waiting=0",
            "DEBUG hallm.engine: step t=20.021000 tokens=2 prompt=0 rows=2 waiting=0",
            "DEBUG hallm.engine: step t=20.025000 tokens=2 prompt=0 rows=2 waiting=0",
            "DEBUG hallm.engine: step t=20.031000 tokens=2 prompt=0 rows=2 waiting=0",
        ]
    )
    s = summarize(last_run(parse(log), 2))
    assert s["requests"] == 2 and s["steps"] == 5
    assert s["arrival_s"] == pytest.approx(0.002)
    assert s["steps_during_arrival"] == 1 and s["tokens_per_step_during_arrival"] == 8
    assert s["prompt_steps"] == 2 and s["prompt_steps_s"] == pytest.approx(0.020)
    assert s["prompt_tokens_per_prompt_step"] == 8
    assert s["decode_steps"] == 2 and s["decode_steps_s"] == pytest.approx(0.010)
    assert s["decode_period_ms_p50"] == pytest.approx(5.0)
    assert s["longest_gap_ms"] == pytest.approx(10.0)
    with pytest.raises(ValueError, match="fewer than 4"):
        last_run(parse(log), 4)
