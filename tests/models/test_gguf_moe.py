"""Mixture-of-experts GGUF files (llama.cpp's layout, tests.utils.tiny_gguf) through hallm's GGUF
path against HF transformers on the original HF model (float32): greedy tokens and logprobs of
several prompts. The GGUF stacks the experts, renames every tensor and leaves the experts' widths
to metadata transformers drops, so a weight mapped wrong or a width left at its default shows up
as different tokens or a refused conversion."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from hallm.entrypoints.llm import LLM
from hallm.platforms import ConfigError
from tests.engine.test_llm_vs_hf import TINY_PROMPTS, assert_matches_reference, hf_reference, params
from tests.utils.tiny_gguf import write_tiny_gguf
from tests.utils.tiny_models import build_tiny_model

#: llama.cpp's qwen2moe has experts in every layer (the tiny qwen2_moe's dense layer 1 has no
#: GGUF form), so that one is built all-sparse.
OVERRIDES: dict[str, dict[str, object]] = {"qwen2_moe": {"mlp_only_layers": []}}


@pytest.fixture(autouse=True)
def _private_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HALLM_CACHE_DIR", str(tmp_path / "cache"))


def _tiny_gguf(arch: str, tmp_path: Path, f16: bool = False, squeeze: bool = True) -> tuple[Path, Path]:
    hf_dir = build_tiny_model(arch, tmp_path / "hf", **OVERRIDES.get(arch, {}))
    return hf_dir, write_tiny_gguf(hf_dir, tmp_path / f"tiny-{arch}.gguf", f16=f16, squeeze=squeeze)


@pytest.mark.parametrize(
    ("arch", "f16", "squeeze"),
    [
        ("qwen2_moe", False, True),
        ("qwen2_moe", True, False),  # shared_expert_gate stored [1, H], as unsqueezing converters do
        ("qwen3_moe", False, True),
        ("qwen3_moe", True, True),
    ],
)
def test_moe_gguf_matches_hf(arch: str, f16: bool, squeeze: bool, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    hf_dir, gguf_file = _tiny_gguf(arch, tmp_path, f16, squeeze)
    llm = LLM(
        model=str(gguf_file),
        device="cpu",
        dtype="float32",
        block_size=4,
        num_gpu_blocks_override=64,
        max_num_batched_tokens=16,
    )
    hf = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    if f16:  # the reference holds the same F16-rounded matrices (norms and router stay F32)
        with torch.no_grad():
            for name, p in hf.named_parameters():
                if p.ndim >= 2 and not name.endswith("mlp.gate.weight"):
                    p.copy_(p.half().float())
    original = AutoTokenizer.from_pretrained(hf_dir)
    outs = llm.generate(TINY_PROMPTS, params(12), use_tqdm=False)
    for prompt, out in zip(TINY_PROMPTS, outs, strict=True):
        # the tokenizer rebuilt from tokenizer.ggml.* splits text as the original does
        assert out.prompt_token_ids == original(prompt).input_ids, prompt
        ref = hf_reference(hf, out.prompt_token_ids, 12, original.pad_token_id)
        assert_matches_reference(out, ref, f"{arch} gguf (f16={f16}): {prompt!r}")


def test_mixtral_gguf_is_refused(tmp_path: Path) -> None:
    _, gguf_file = _tiny_gguf("mixtral", tmp_path)
    with pytest.raises(
        ConfigError, match=r"Mixtral-style mixture of experts \(llama.cpp architecture 'llama' with 4"
    ):
        LLM(model=str(gguf_file), device="cpu", dtype="float32")
    assert not list((tmp_path / "cache" / "gguf").iterdir())  # nothing half-converted left behind


def test_olmoe_gguf_is_refused(tmp_path: Path) -> None:
    _, gguf_file = _tiny_gguf("olmoe", tmp_path)
    with pytest.raises(ConfigError, match="GGUF model with architecture olmoe is not supported"):
        LLM(model=str(gguf_file), device="cpu", dtype="float32")


def test_gpt_oss_gguf_is_refused(tmp_path: Path) -> None:
    _, gguf_file = _tiny_gguf("gpt_oss", tmp_path)
    with pytest.raises(
        ConfigError, match="holds a 'gpt-oss' mixture of experts, which hallm cannot load from GGUF"
    ):
        LLM(model=str(gguf_file), device="cpu", dtype="float32")
