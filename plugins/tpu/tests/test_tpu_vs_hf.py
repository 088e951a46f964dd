"""The JAX worker (JAX CPU backend, float32) through the LLM API against HF transformers on the
same weights: greedy tokens, sampled-token logprobs and prompt logprobs for prompts of different
lengths in one batch, with chunked prefill (a 16-token step budget) and with preemption forced by
a small KV pool; seeded sampling equals the cpu plugin's. The core tests' oracle and tiny models
(tests.engine.test_llm_vs_hf, tests.utils.tiny_models) are reused as they are.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from hallm import LLM, SamplingParams
from tests.engine.test_llm_vs_hf import TINY_PROMPTS, assert_matches_reference, hf_reference, params

MAX_TOKENS = 12
STEP_TOKENS = 16  # below the longer prompts' lengths: they are prefilled in chunks


def tpu_llm(path: Path, **overrides: Any) -> LLM:
    kwargs: dict[str, Any] = dict(
        device="tpu",
        dtype="float32",
        block_size=4,
        num_gpu_blocks_override=64,
        max_num_batched_tokens=STEP_TOKENS,
        max_num_seqs=4,  # few request buckets: few programs to compile
    )
    kwargs.update(overrides)
    return LLM(model=str(path), **kwargs)


def check_against_hf(llm: LLM, path: Path, label: str) -> None:
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    tokenizer = llm.get_tokenizer()
    outs = llm.generate(TINY_PROMPTS, params(MAX_TOKENS), use_tqdm=False)
    lengths = [len(o.prompt_token_ids) for o in outs]
    assert len(set(lengths)) == len(TINY_PROMPTS) and max(lengths) > STEP_TOKENS, lengths
    for prompt, out in zip(TINY_PROMPTS, outs, strict=True):
        ref = hf_reference(hf, out.prompt_token_ids, MAX_TOKENS, tokenizer.pad_token_id)
        assert_matches_reference(out, ref, f"{label}: {prompt!r}")


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2", "qwen3"])
def test_tiny_models_match_hf(arch: str, tiny_model: Callable[[str], Path]) -> None:
    """mistral's window (8) is shorter than the longer prompts; qwen2 has q/k/v biases and tied
    embeddings; qwen3 has q/k norms and head_dim != hidden / heads."""
    path = tiny_model(arch)
    llm = tpu_llm(path)
    assert type(llm.engine.executor.worker).__name__ == "TpuWorker"
    check_against_hf(llm, path, arch)


def test_preemption_with_a_small_pool(tiny_model: Callable[[str], Path]) -> None:
    path = tiny_model("llama")
    llm = tpu_llm(path, num_gpu_blocks_override=14)
    check_against_hf(llm, path, "llama, small pool")
    assert llm.engine.scheduler.num_preemptions > 0, "the pool should have forced preemption"


def test_seeded_sampling_equals_the_cpu_plugin(tiny_model: Callable[[str], Path]) -> None:
    path = tiny_model("qwen2")
    sampling = [
        SamplingParams(temperature=0.8, top_p=0.9, seed=7, max_tokens=8),
        SamplingParams(temperature=1.0, top_k=20, seed=11, max_tokens=8, repetition_penalty=1.3),
        SamplingParams(temperature=0.7, min_p=0.05, seed=3, max_tokens=8, presence_penalty=0.5),
    ]
    prompts = TINY_PROMPTS[:3]
    tpu = tpu_llm(path).generate(prompts, sampling, use_tqdm=False)
    cpu = LLM(model=str(path), device="cpu", dtype="float32", block_size=4, num_gpu_blocks_override=64)
    expected = cpu.generate(prompts, sampling, use_tqdm=False)
    for ours, theirs in zip(tpu, expected, strict=True):
        assert ours.outputs[0].token_ids == theirs.outputs[0].token_ids


def test_pallas_kernel_in_the_model(tiny_model: Callable[[str], Path]) -> None:
    """The Pallas kernel (interpret mode) serves the whole model: sliding window included."""
    path = tiny_model("mistral")
    llm = tpu_llm(path, attention_backend="pallas_paged")
    check_against_hf(llm, path, "mistral, pallas_paged")
