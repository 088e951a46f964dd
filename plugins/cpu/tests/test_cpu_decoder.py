"""The one-call decoder stack (hallm_cpu.decoder) gives exactly what the swapped modules give."""

from __future__ import annotations

import pytest
import torch
from hallm_cpu import decoder, native
from transformers import LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config

from hallm import LLM, SamplingParams

pytestmark = pytest.mark.skipif(not native.available(), reason="no C compiler: native kernels not built")

SHAPE = dict(
    hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
    vocab_size=300, max_position_embeddings=512,
)  # fmt: skip
CONFIGS = {
    "llama": lambda: LlamaConfig(**SHAPE),
    "qwen2 (qkv bias)": lambda: Qwen2Config(**SHAPE),
    "qwen3 (q/k norm)": lambda: Qwen3Config(head_dim=16, **SHAPE),
    "mistral (sliding window)": lambda: MistralConfig(sliding_window=12, **SHAPE),
}


def generate(model_dir: str, dtype: str) -> list:
    llm = LLM(
        model=model_dir, device="cpu", dtype=dtype, load_format="dummy", skip_tokenizer_init=True,
        max_model_len=256, block_size=8, max_num_batched_tokens=40, seed=0,
    )  # fmt: skip
    # Mixed lengths under a 40-token budget: chunked prefills and decodes share steps.
    prompts = [{"prompt_token_ids": [(7 * i + 3 * r) % 290 + 5 for i in range(5 + 9 * r)]} for r in range(5)]
    params = SamplingParams(max_tokens=20, temperature=0, ignore_eos=True, logprobs=3)
    return llm.generate(prompts, params, use_tqdm=False)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("arch", list(CONFIGS))
def test_stack_matches_the_module_path_exactly(arch: str, dtype: str, tmp_path, monkeypatch) -> None:
    CONFIGS[arch]().save_pretrained(tmp_path)
    fast_steps = []
    real_context = decoder.get_forward_context
    monkeypatch.setattr(decoder, "get_forward_context", lambda: fast_steps.append(1) or real_context())
    stacked = generate(str(tmp_path), dtype)
    assert len(fast_steps) >= 20, "the one-call path never ran"
    monkeypatch.setattr(decoder, "stack_decoders", lambda model: model)
    modules = generate(str(tmp_path), dtype)
    for a, b in zip(stacked, modules, strict=True):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
        for la, lb in zip(a.outputs[0].logprobs, b.outputs[0].logprobs, strict=True):
            assert {k: v.logprob for k, v in la.items()} == {k: v.logprob for k, v in lb.items()}


def test_only_hallm_llama_models_with_native_layers_are_stacked() -> None:
    from hallm.core.models.llama import LlamaModel

    cfg = LlamaConfig(**SHAPE)
    plain = LlamaModel(cfg, qkv_bias=False, o_bias=False, qk_norm=False)
    assert not decoder.supports(plain)  # its layers were not swapped to native ones
    assert not decoder.supports(torch.nn.Linear(4, 4))
