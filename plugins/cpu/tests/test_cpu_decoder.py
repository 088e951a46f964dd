"""The one-call decoder stack (hallm_cpu.decoder) gives exactly what the layers give one op at a time."""

from __future__ import annotations

import pytest
from hallm_cpu import decoder, native
from hallm_cpu import ops as cpu_ops
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
    monkeypatch.setattr(cpu_ops, "decoder_stack", lambda weights: None)
    modules = generate(str(tmp_path), dtype)
    for a, b in zip(stacked, modules, strict=True):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
        for la, lb in zip(a.outputs[0].logprobs, b.outputs[0].logprobs, strict=True):
            assert {k: v.logprob for k, v in la.items()} == {k: v.logprob for k, v in lb.items()}


def test_the_stack_is_declined_without_natively_packed_projections() -> None:
    from hallm.core.layers.op_context import building_with
    from hallm.core.models.llama import LlamaModel

    cfg = LlamaConfig(**SHAPE)
    with building_with(None):  # the reference table: projections run F.linear
        plain = LlamaModel(cfg, qkv_bias=False, o_bias=False, qk_norm=False)
    with building_with(cpu_ops.cpu_op_table()):
        native_model = LlamaModel(cfg, qkv_bias=False, o_bias=False, qk_norm=False)
    plain.prepare_kernels()
    for m in reversed(list(native_model.modules())):
        if hasattr(m, "prepare_kernels"):
            m.prepare_kernels()
    assert plain.stack is None
    assert isinstance(native_model.stack, decoder.CpuDecoderStack)
    stack_weights = [layer.stack_weights() for layer in plain.layers]
    assert (
        decoder.decoder_stack(
            type(native_model.stack.weights)(
                layers=tuple(stack_weights),
                final_norm=plain.norm.weight,
                final_eps=1e-6,
                inv_freq=plain.rotary_emb.inv_freq,
                rotary_scaling=1.0,
            )
        )
        is None
    )
