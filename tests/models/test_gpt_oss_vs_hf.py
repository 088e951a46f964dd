"""gpt-oss against HF transformers (float32, the CPU plugin): attention sinks, alternating
sliding/full layers, yarn rope and its biased router/experts, on a batch of prompts of
different lengths, prefilled in chunks of a 16-token budget, with preemption."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from hallm.entrypoints.llm import LLM
from tests.engine.test_llm_vs_hf import TINY_PROMPTS, assert_matches_reference, hf_reference, params
from tests.utils.tiny_models import build_tiny_model


@pytest.mark.parametrize("attention_backend", ["cpu_native", "cpu_reference"])
def test_gpt_oss_matches_hf(attention_backend: str, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    path = build_tiny_model("gpt_oss", tmp_path / "gpt_oss")
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
    for prompt, out in zip(TINY_PROMPTS, outs, strict=True):
        ref = hf_reference(hf, out.prompt_token_ids, 12, tokenizer.pad_token_id)
        assert_matches_reference(out, ref, f"gpt_oss/{attention_backend}: {prompt!r}")


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
