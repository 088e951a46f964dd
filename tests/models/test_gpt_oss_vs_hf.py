"""gpt-oss (native and through the generic path) against HF transformers (float32, the CPU plugin): attention sinks, alternating
sliding/full layers, yarn rope and its biased router/experts, on a batch of prompts of
different lengths, prefilled in chunks of a 16-token budget, with preemption."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from hallm.entrypoints.llm import LLM
from tests.engine.test_llm_vs_hf import TINY_PROMPTS, assert_matches_reference, hf_reference, params
from tests.utils.tiny_models import build_tiny_model


@pytest.mark.parametrize(
    ("impl", "attention_backend"),
    [("native", "cpu_native"), ("native", "cpu_reference"), ("generic", "cpu_native")],
)
def test_gpt_oss_matches_hf(
    impl: str, attention_backend: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Native (hallm.core.models.gpt_oss) and through the generic path (transformers' modules,
    the sinks handed over as `s_aux`)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from hallm.core.models import registry

    if impl == "generic":
        monkeypatch.delitem(registry.NATIVE_MODELS, "GptOssForCausalLM")
    path = build_tiny_model("gpt_oss", tmp_path / "gpt_oss")
    expected = "GptOssForCausalLM" if impl == "native" else "GenericCausalLM"
    assert registry.resolve_model_class(AutoConfig.from_pretrained(path)).__name__ == expected
    llm = LLM(
        model=str(path),
        device="cpu",
        dtype="float32",
        block_size=4,
        num_gpu_blocks_override=16,
        max_num_batched_tokens=16,
        attention_backend=attention_backend,
    )
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    sinks = hf.model.layers[0].self_attn.sinks
    assert float(sinks.detach().abs().max()) > 1.0  # sinks large enough to change every softmax
    tokenizer = llm.get_tokenizer()
    outs = llm.generate(TINY_PROMPTS, params(12), use_tqdm=False)
    assert llm.engine.scheduler.num_preemptions > 0, "the pool should have forced preemption"
    assert max(len(o.prompt_token_ids) for o in outs) > 16  # chunked prefill, past the window
    for prompt, out in zip(TINY_PROMPTS, outs, strict=True):
        ref = hf_reference(hf, out.prompt_token_ids, 12, tokenizer.pad_token_id)
        assert_matches_reference(out, ref, f"gpt_oss/{impl}/{attention_backend}: {prompt!r}")


def test_backend_without_sinks_refuses_gpt_oss(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """On a device whose backends do not declare sinks, gpt-oss is refused with the reason."""
    from hallm_cpu.attention import CpuNativeAttention, CpuReferenceAttention

    from hallm.platforms import FEATURE_SINKS, BackendSelectionError

    for cls in (CpuNativeAttention, CpuReferenceAttention):
        monkeypatch.setattr(cls, "features", cls.features - {FEATURE_SINKS})
    path = build_tiny_model("gpt_oss", tmp_path / "gpt_oss")
    with pytest.raises(BackendSelectionError) as err:
        LLM(model=str(path), device="cpu", dtype="float32", num_gpu_blocks_override=16)
    message = str(err.value)
    assert "features=['sinks'" in message and "features ['sinks'] not supported" in message, message


def test_mxfp4_expert_weights_are_refused_with_the_way_out(tmp_path: Path) -> None:
    """OpenAI's published gpt-oss stores its experts in MXFP4 (`*_blocks`, `*_scales`)."""
    from safetensors.torch import load_file, save_file

    from hallm.core.models.interface import CheckpointMismatchError

    path = build_tiny_model("gpt_oss", tmp_path / "gpt_oss")
    weights = load_file(path / "model.safetensors")
    for layer in range(2):
        prefix = f"model.layers.{layer}.mlp.experts."
        weights[prefix + "gate_up_proj_blocks"] = torch.zeros(4, 64, 2, 16, dtype=torch.uint8)
        weights[prefix + "gate_up_proj_scales"] = torch.zeros(4, 64, 2, dtype=torch.uint8)
        del weights[prefix + "gate_up_proj"]
    save_file(weights, path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointMismatchError, match=r"MXFP4-quantized.*Mxfp4Config\(dequantize=True\)"):
        LLM(model=str(path), device="cpu", dtype="float32", num_gpu_blocks_override=16)


def test_experts_through_fused_moe_match_transformers() -> None:
    """gpt-oss's MLP (router + experts through the op table's reference `fused_moe`, the
    checkpoint's expert tensors converted by `to_op_layout`) against transformers' GptOssMLP on
    the same weights, with gate/up projections large enough that both clamps bind."""
    import transformers as tf
    from transformers.models.gpt_oss.modeling_gpt_oss import GptOssMLP as HFGptOssMLP

    from hallm.core.models.gpt_oss import GptOssMLP, to_op_layout

    config = tf.GptOssConfig(hidden_size=32, intermediate_size=24, num_local_experts=5, num_experts_per_tok=2)
    hf = HFGptOssMLP(config).eval()
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in hf.named_parameters():
            scale = 4.0 * 32**-0.5 if name == "experts.gate_up_proj" else 0.5
            p.copy_(torch.randn(p.shape, generator=gen) * scale)
    ours = GptOssMLP(config).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            ours.get_parameter(name).copy_(to_op_layout(f"model.layers.0.mlp.{name}", p))
    x = torch.randn(11, 32, generator=gen)
    with torch.no_grad():
        gate_up = torch.einsum("th,ehi->tei", x, hf.experts.gate_up_proj) + hf.experts.gate_up_proj_bias
        assert (gate_up[..., ::2] > config.swiglu_limit).any()
        assert (gate_up[..., 1::2].abs() > config.swiglu_limit).any()
        want, _ = hf(x[None])
        got = ours(x)
    torch.testing.assert_close(got, want[0], atol=1e-4, rtol=1e-5)
