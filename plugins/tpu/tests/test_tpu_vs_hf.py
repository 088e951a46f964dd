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


def test_longrope_per_request(tmp_path: Path) -> None:
    """Long-rope's factors are chosen per request (as the core's `longrope_use_long`): a request's
    greedy tokens equal HF's for its prompt alone, batched with prompts longer than the original
    context or alone; one short prompt grows past the original context while generating."""
    from transformers import AutoModelForCausalLM

    from tests.models.test_longrope_vs_hf import MAX_TOKENS, ORIGINAL_CONTEXT
    from tests.utils.tiny_models import build_tiny_model

    path = build_tiny_model("llama_longrope", tmp_path / "llama_longrope")
    llm = tpu_llm(path)
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    tokenizer = llm.get_tokenizer()
    n = MAX_TOKENS["llama_longrope"]
    batched = llm.generate(TINY_PROMPTS, params(n), use_tqdm=False)
    lengths = [len(o.prompt_token_ids) for o in batched]
    assert max(lengths) > ORIGINAL_CONTEXT and min(lengths) + n > ORIGINAL_CONTEXT, lengths
    alone = [llm.generate([p], params(n), use_tqdm=False)[0] for p in TINY_PROMPTS[:2]]
    for prompt, out in zip(TINY_PROMPTS, batched, strict=True):
        ref = hf_reference(hf, out.prompt_token_ids, n, tokenizer.pad_token_id)
        assert_matches_reference(out, ref, f"batched: {prompt!r}")
    for prompt, out, b in zip(TINY_PROMPTS, alone, batched, strict=False):
        assert out.outputs[0].token_ids == b.outputs[0].token_ids, f"{prompt!r} alone vs batched"
