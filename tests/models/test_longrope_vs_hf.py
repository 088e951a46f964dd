"""Long-rope picks its factors per request: a request's greedy tokens equal HF's for the prompt
alone, whether it runs alone or batched with prompts longer than the original context
(native Llama with longrope scaling; Phi-3 through the generic path), float32, the CPU plugin,
with chunked prefill (a 16-token budget)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from hallm.entrypoints.llm import LLM
from tests.engine.test_llm_vs_hf import TINY_PROMPTS, assert_matches_reference, hf_reference, params
from tests.utils.tiny_models import build_tiny_model

ORIGINAL_CONTEXT = 16  # the tiny configs' original_max_position_embeddings

# HF's Phi-3 generate drops its cache and recomputes every key with the long factors when a
# sequence grows past the original context during generation; a paged cache keeps the keys it
# wrote (as HF's Llama does). So Phi-3's short prompts stop before crossing; Llama's cross it.
MAX_TOKENS = {"llama_longrope": 14, "phi3_longrope": 10}


@pytest.mark.parametrize("arch", list(MAX_TOKENS))
def test_longrope_per_request_matches_hf(arch: str, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    path = build_tiny_model(arch, tmp_path / arch)
    llm = LLM(
        model=str(path),
        device="cpu",
        dtype="float32",
        block_size=4,
        num_gpu_blocks_override=64,
        max_num_batched_tokens=16,
    )
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    tokenizer = llm.get_tokenizer()
    n = MAX_TOKENS[arch]
    batched = llm.generate(TINY_PROMPTS, params(n), use_tqdm=False)
    lengths = [len(o.prompt_token_ids) for o in batched]
    assert min(lengths) + n > ORIGINAL_CONTEXT or arch != "llama_longrope"  # Llama: one crosses
    assert max(lengths) > ORIGINAL_CONTEXT  # a long prompt shares the batch with short ones
    alone = [llm.generate([p], params(n), use_tqdm=False)[0] for p in TINY_PROMPTS[:2]]
    for prompt, out in zip(TINY_PROMPTS, batched, strict=True):
        ref = hf_reference(hf, out.prompt_token_ids, n, tokenizer.pad_token_id)
        assert_matches_reference(out, ref, f"{arch} batched: {prompt!r}")
    for prompt, out, b in zip(TINY_PROMPTS, alone, batched, strict=False):
        assert out.outputs[0].token_ids == b.outputs[0].token_ids, f"{arch}: {prompt!r} alone vs batched"
