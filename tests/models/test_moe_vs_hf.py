"""Native mixture-of-experts models against HF transformers (float32, the CPU plugin): greedy
tokens and logprobs of a batch of prompts of different lengths, prefilled in chunks of a
16-token budget, with a KV pool small enough that requests are preempted and recomputed."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from hallm.core.models.registry import resolve_model_class
from hallm.entrypoints.llm import LLM
from tests.engine.test_llm_vs_hf import TINY_PROMPTS, assert_matches_reference, hf_reference, params
from tests.utils.tiny_models import MOE_ARCHS

NATIVE_CLASS = {
    "mixtral": "MixtralForCausalLM",
    "qwen2_moe": "Qwen2MoeForCausalLM",
    "qwen3_moe": "Qwen3MoeForCausalLM",
    "olmoe": "OlmoeForCausalLM",
}


@pytest.mark.parametrize("arch", MOE_ARCHS)
def test_moe_model_matches_hf(arch: str, tiny_model_dir: Callable[[str], Path]) -> None:
    from transformers import AutoConfig, AutoModelForCausalLM

    path = tiny_model_dir(arch)
    # Native, never the generic path.
    assert resolve_model_class(AutoConfig.from_pretrained(path)).__name__ == NATIVE_CLASS[arch]
    llm = LLM(
        model=str(path),
        device="cpu",
        dtype="float32",
        block_size=4,
        num_gpu_blocks_override=16,
        max_num_batched_tokens=16,
    )
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    tokenizer = llm.get_tokenizer()
    outs = llm.generate(TINY_PROMPTS, params(12), use_tqdm=False)
    assert llm.engine.scheduler.num_preemptions > 0, "the pool should have forced preemption"
    assert len({len(o.prompt_token_ids) for o in outs}) == len(TINY_PROMPTS)
    assert max(len(o.prompt_token_ids) for o in outs) > 16  # chunked prefill happened
    for prompt, out in zip(TINY_PROMPTS, outs, strict=True):
        ref = hf_reference(hf, out.prompt_token_ids, 12, tokenizer.pad_token_id)
        assert_matches_reference(out, ref, f"{arch}: {prompt!r}")
