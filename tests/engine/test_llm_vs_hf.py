"""hallm through the LLM API against HF transformers on the same weights (float32): greedy tokens,
sampled-token logprobs and prompt logprobs, for several prompts of different lengths in one
generate() call, on tiny random models of the native architectures and on the real SmolLM2.

Random tiny models have flat distributions, so where the greedy tokens differ the reference's
top-2 logprob gap at that step must be below TOL (a near tie) and the comparison of that sequence
stops there.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest
import torch

from hallm.core.outputs import RequestOutput
from hallm.core.sampling_params import SamplingParams
from hallm.entrypoints.llm import LLM

TOL = 1e-3
NUM_LOGPROBS = 3
NUM_PROMPT_LOGPROBS = 2
TINY_PROMPTS = [
    "Hello",
    "The capital of France is",
    "def add(a, b):\n    return a + b\n\nfor i in range(10):",
    "Once upon a time there was a small model that learned to count: one, two, three, four,",
]


@dataclasses.dataclass
class Reference:
    tokens: list[int]  # HF generate(do_sample=False), new tokens only
    step_logprobs: list[torch.Tensor]  # [V] log_softmax of the logits at each generated step
    prompt_logprobs: torch.Tensor  # [P, V]: row p predicts prompt token p + 1


@torch.no_grad()
def hf_reference(hf: Any, prompt_ids: Sequence[int], max_new_tokens: int, pad_token_id: int) -> Reference:
    ids = torch.tensor([list(prompt_ids)], dtype=torch.long)
    gen = hf.generate(
        ids,
        do_sample=False,
        max_new_tokens=max_new_tokens,
        output_logits=True,
        return_dict_in_generate=True,
        pad_token_id=pad_token_id,
    )
    tokens = gen.sequences[0, len(prompt_ids) :].tolist()
    steps = [torch.log_softmax(logits[0].float(), dim=-1) for logits in gen.logits]
    prompt = torch.log_softmax(hf(input_ids=ids, use_cache=False).logits[0].float(), dim=-1)
    return Reference(tokens, steps[: len(tokens)], prompt)


def assert_matches_reference(out: RequestOutput, ref: Reference, label: str) -> None:
    completion = out.outputs[0]
    ours = completion.token_ids
    assert completion.logprobs is not None and len(completion.logprobs) == len(ours)
    diverged = False
    for t, (mine, theirs) in enumerate(zip(ours, ref.tokens, strict=False)):
        ref_lp = ref.step_logprobs[t]
        entries = completion.logprobs[t]
        assert mine in entries and len(entries) in (NUM_LOGPROBS, NUM_LOGPROBS + 1), (label, t, entries)
        assert_entries(entries, ref_lp, mine, (label, t))
        if mine != theirs:
            top2 = ref_lp.topk(2).values
            gap = float(top2[0] - top2[1])
            assert gap < TOL, f"{label}: step {t} chose {mine}, HF {theirs}, HF top-2 gap {gap:.2e}"
            diverged = True
            break
    if not diverged:
        assert ours == ref.tokens, (label, ours, ref.tokens)
    assert completion.cumulative_logprob == pytest.approx(
        sum(completion.logprobs[t][tok].logprob for t, tok in enumerate(ours)), abs=1e-4
    )

    prompt_ids = out.prompt_token_ids
    assert out.prompt_logprobs is not None and len(out.prompt_logprobs) == len(prompt_ids)
    assert out.prompt_logprobs[0] is None
    for pos in range(1, len(prompt_ids)):
        entries = out.prompt_logprobs[pos]
        assert entries is not None and prompt_ids[pos] in entries, (label, pos)
        assert len(entries) in (NUM_PROMPT_LOGPROBS, NUM_PROMPT_LOGPROBS + 1)
        ref_lp = ref.prompt_logprobs[pos - 1]
        assert_entries(entries, ref_lp, prompt_ids[pos], (label, "prompt", pos))


def assert_entries(entries: dict[int, Any], ref_lp: torch.Tensor, chosen: int, where: object) -> None:
    """Every logprob within TOL of the reference; the chosen token's rank is vLLM's (1 + the
    number of more likely tokens) and the top-k are the reference's top-k, up to near ties."""
    top = ref_lp.topk(len(entries) + 1).values
    for token_id, lp in entries.items():
        assert abs(lp.logprob - float(ref_lp[token_id])) < TOL, (where, token_id, lp)
        if token_id != chosen:
            assert abs(lp.logprob - float(top[lp.rank - 1])) < TOL, (where, token_id, lp)
    value, rank = ref_lp[chosen], entries[chosen].rank
    assert int((ref_lp > value + TOL).sum()) + 1 <= rank <= int((ref_lp >= value - TOL).sum()), (where, rank)


def params(max_tokens: int) -> SamplingParams:
    return SamplingParams(
        temperature=0.0,
        max_tokens=max_tokens,
        logprobs=NUM_LOGPROBS,
        prompt_logprobs=NUM_PROMPT_LOGPROBS,
    )


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2", "qwen3"])
def test_tiny_models_match_hf(arch: str, tiny_model_dir: Callable[[str], Path]) -> None:
    from transformers import AutoModelForCausalLM

    path = tiny_model_dir(arch)
    # A small token budget, so the longer prompts are also prefilled in chunks.
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
    outs = llm.generate(TINY_PROMPTS, params(12), use_tqdm=False)
    lengths = {len(o.prompt_token_ids) for o in outs}
    assert len(lengths) == len(TINY_PROMPTS), lengths
    for prompt, out in zip(TINY_PROMPTS, outs, strict=True):
        assert out.prompt_token_ids == tokenizer(prompt).input_ids
        ref = hf_reference(hf, out.prompt_token_ids, 12, tokenizer.pad_token_id)
        assert_matches_reference(out, ref, f"{arch}: {prompt!r}")


def test_smollm2_matches_hf_and_knows_paris(smollm2_dir: Path) -> None:
    from transformers import AutoModelForCausalLM

    llm = LLM(
        model=str(smollm2_dir),
        device="cpu",
        dtype="float32",
        max_model_len=512,
        block_size=16,
        num_gpu_blocks_override=32,
    )
    hf = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
    tokenizer = llm.get_tokenizer()
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    chat = [{"role": "user", "content": "What is the capital of France?"}]
    (answer,) = llm.chat(chat, params(16), use_tqdm=False)
    assert "Paris" in answer.outputs[0].text, answer.outputs[0].text
    expected_prompt = tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=True)
    if not isinstance(expected_prompt, list):
        expected_prompt = expected_prompt["input_ids"]
    assert answer.prompt_token_ids == list(expected_prompt)
    assert_matches_reference(answer, hf_reference(hf, answer.prompt_token_ids, 16, pad), "smollm2 chat")

    prompts = ["The capital of France is", "Gravity is the force that"]
    for prompt, out in zip(prompts, llm.generate(prompts, params(8), use_tqdm=False), strict=True):
        assert_matches_reference(out, hf_reference(hf, out.prompt_token_ids, 8, pad), f"smollm2: {prompt!r}")
