"""The default model, SmolLM2-135M-Instruct, on the JAX worker (CPU backend, float32): its
greedy chat answer names Paris, and its tokens and logprobs match HF transformers' with the
oracle of the core's own SmolLM2 test (tests.engine.test_llm_vs_hf), which the cpu plugin
passes too."""

from __future__ import annotations

from pathlib import Path

import torch

from hallm import LLM
from tests.engine.test_llm_vs_hf import assert_matches_reference, hf_reference, params


def test_smollm2_matches_hf_and_knows_paris(smollm2_dir: Path) -> None:
    from transformers import AutoModelForCausalLM

    # A 16-token step budget: four programs to compile; the chat prompt is prefilled in chunks.
    llm = LLM(
        model=str(smollm2_dir),
        device="tpu",
        dtype="float32",
        max_model_len=512,
        block_size=16,
        num_gpu_blocks_override=32,
        max_num_batched_tokens=16,
        max_num_seqs=4,
    )
    hf = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
    tokenizer = llm.get_tokenizer()
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    chat = [{"role": "user", "content": "What is the capital of France?"}]
    (answer,) = llm.chat(chat, params(16), use_tqdm=False)
    assert "Paris" in answer.outputs[0].text, answer.outputs[0].text
    assert len(answer.prompt_token_ids) > 16
    assert_matches_reference(answer, hf_reference(hf, answer.prompt_token_ids, 16, pad), "smollm2 chat")
