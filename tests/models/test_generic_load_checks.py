"""The generic path at load: what it cannot run exactly is refused from the config alone (before
any model is built) with the reason a user sees; what it can run (OPT's pre-scaled q, Gemma-3 as
published with its nested text config) matches HF's greedy generate."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import torch

from hallm.core.models import resolve_model_class
from hallm.core.models.generic import GenericCausalLM
from hallm.core.sampling_params import SamplingParams
from hallm.entrypoints.llm import LLM
from hallm.platforms import ConfigError
from tests.utils.tiny_models import _redraw, build_tokenizer

V = 512
COMMON: dict[str, Any] = dict(
    vocab_size=V,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    bos_token_id=0,
    eos_token_id=1,
    pad_token_id=2,
)
PROMPTS = ["The capital of France is", "Once upon a time there was a small model that learned to count:"]


def _save(config: Any, out: Path, cls: Any = None) -> Path:
    import transformers as tf

    torch.manual_seed(0)
    model = (
        cls._from_config(config, dtype=torch.float32) if cls else tf.AutoModelForCausalLM.from_config(config)
    )
    _redraw(model, 0)
    model.save_pretrained(out)
    build_tokenizer().save_pretrained(out)
    return out


def _assert_greedy_matches_hf(path: Path, hf_cls: Any, **llm_kwargs: Any) -> None:
    tok = build_tokenizer()
    hf = hf_cls.from_pretrained(path, dtype=torch.float32).eval()
    llm = LLM(model=str(path), device="cpu", dtype="float32", **llm_kwargs)
    ids = [tok(p)["input_ids"] for p in PROMPTS]
    outs = llm.generate([{"prompt_token_ids": i} for i in ids], SamplingParams(max_tokens=10, temperature=0))
    for prompt, out in zip(ids, outs, strict=True):
        ref = hf.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=10, pad_token_id=2)
        assert list(out.outputs[0].token_ids) == ref[0, len(prompt) :].tolist()


def test_opt_prescaled_query_matches_hf(tmp_path: Path) -> None:
    import transformers as tf

    config = tf.OPTConfig(
        vocab_size=V, hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4,
        word_embed_proj_dim=64, max_position_embeddings=256, bos_token_id=0, eos_token_id=1, pad_token_id=2,
    )  # fmt: skip
    path = _save(config, tmp_path / "opt")
    assert resolve_model_class(config) is GenericCausalLM
    _assert_greedy_matches_hf(path, tf.OPTForCausalLM)


def test_gemma3_as_published_runs_its_text_model(tmp_path: Path) -> None:
    """Gemma3ForConditionalGeneration with a nested text_config: the text model alone, its
    context length from the text config, its weights from the multimodal checkpoint."""
    import transformers as tf

    config = tf.Gemma3Config(
        text_config=dict(**COMMON, num_key_value_heads=2, head_dim=16, max_position_embeddings=256, sliding_window=8),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                           image_size=28, patch_size=14),
        mm_tokens_per_image=4,
        architectures=["Gemma3ForConditionalGeneration"],
    )  # fmt: skip
    path = _save(config, tmp_path / "gemma3", tf.Gemma3ForConditionalGeneration)
    _assert_greedy_matches_hf(path, tf.Gemma3ForConditionalGeneration)


def _refused(config: Any, match: str, monkeypatch: pytest.MonkeyPatch) -> str:
    """The refusal comes from the config alone: building the model would fail the test."""

    def no_build(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("the model was built before the refusal")

    monkeypatch.setattr(GenericCausalLM, "__init__", no_build)
    with pytest.raises(ConfigError, match=match) as err:
        resolve_model_class(config)
    return str(err.value)


@pytest.mark.parametrize(
    ("name", "kwargs", "match"),
    [
        ("PhimoeConfig", dict(num_key_value_heads=2, num_local_experts=4), "weight conversion .fused mixture-of-experts"),
        (
            "DeepseekV2Config",
            dict(kv_lora_rank=16, q_lora_rank=None, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8),
            "multi-head latent attention with value head size 8 != query/key head size 16",
        ),
        (
            "Llama4TextConfig",
            dict(num_key_value_heads=2, head_dim=16, attention_chunk_size=8, num_local_experts=1,
                 intermediate_size_mlp=128, interleave_moe_layer_step=1, architectures=["Llama4ForCausalLM"]),
            r"chunked attention \(attention_chunk_size=8, as in Llama-4\)",
        ),
    ],
)  # fmt: skip
def test_refused_from_the_config(
    name: str, kwargs: dict[str, Any], match: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    import transformers as tf

    config = getattr(tf, name)(**COMMON | kwargs)
    message = _refused(config, match, monkeypatch)
    assert "is not supported" in message


@pytest.mark.parametrize(
    ("name", "kwargs"),
    [
        ("MixtralConfig", dict(num_key_value_heads=2, num_local_experts=4)),
        ("Qwen2MoeConfig", dict(num_key_value_heads=2, num_experts=4)),
        ("Qwen3MoeConfig", dict(num_key_value_heads=2, num_experts=4)),
        ("OlmoeConfig", dict(num_key_value_heads=2, num_experts=4)),
    ],
)  # fmt: skip
def test_native_moe_models_bypass_the_generic_path(name: str, kwargs: dict[str, Any]) -> None:
    """MoE families with a native hallm model resolve to it, never to the generic refusal."""
    import transformers as tf

    config = getattr(tf, name)(**COMMON | kwargs)
    cls = resolve_model_class(config)
    assert cls is not GenericCausalLM
    assert cls.__module__ == "hallm.core.models.moe"


def test_unknown_attention_layer_type_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    import transformers as tf

    config = tf.Gemma2Config(**COMMON, num_key_value_heads=2, head_dim=16)
    config.layer_types = ["full_attention", "linear_attention"]
    _refused(config, r"attention layer types \['linear_attention'\]", monkeypatch)


def test_bloom_asks_for_max_model_len_then_is_refused(tmp_path: Path) -> None:
    """BLOOM (ALiBi) has no context length in its config, and its attention bypasses the
    attention-function interface: both are clear errors, never a TypeError."""
    import transformers as tf

    config = tf.BloomConfig(vocab_size=V, hidden_size=64, n_layer=2, n_head=4, bos_token_id=0, eos_token_id=1)
    path = _save(config, tmp_path / "bloom")
    with pytest.raises(ConfigError, match=r"gives no context length .*pass --max-model-len"):
        LLM(model=str(path), device="cpu", dtype="float32")
    with pytest.raises(ConfigError, match="BloomForCausalLM does not route attention"):
        LLM(model=str(path), device="cpu", dtype="float32", max_model_len=128)


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_bad_weight_file_names_the_file(tmp_path: Path, damage: str) -> None:
    import transformers as tf

    config = tf.OPTConfig(
        vocab_size=V, hidden_size=64, ffn_dim=128, num_hidden_layers=1, num_attention_heads=4,
        word_embed_proj_dim=64, max_position_embeddings=64, bos_token_id=0, eos_token_id=1, pad_token_id=2,
    )  # fmt: skip
    path = _save(config, tmp_path / "opt")
    weights = path / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2] if damage == "truncate" else b"\x07garbage" * 64)
    with pytest.raises(
        ConfigError, match=re.escape(f"weight file {weights} is not a readable safetensors file")
    ):
        LLM(model=str(path), device="cpu", dtype="float32")


def test_missing_tokenizer_files_are_named(tmp_path: Path) -> None:
    import transformers as tf

    config = tf.OPTConfig(
        vocab_size=V, hidden_size=64, ffn_dim=128, num_hidden_layers=1, num_attention_heads=4,
        word_embed_proj_dim=64, max_position_embeddings=64, bos_token_id=0, eos_token_id=1, pad_token_id=2,
    )  # fmt: skip
    path = _save(config, tmp_path / "opt")
    for f in path.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens", "vocab", "merges")):
            f.unlink()
    with pytest.raises(
        ConfigError, match=r"has no tokenizer files \(none of .*tokenizer.json.*pass --tokenizer"
    ):
        LLM(model=str(path), device="cpu", dtype="float32")


@pytest.mark.parametrize(
    ("name", "kwargs", "layers"),
    [
        ("BertConfig", dict(is_decoder=True, architectures=["BertLMHeadModel"]), "cls.predictions.transform"),
        ("RobertaConfig", dict(is_decoder=True, architectures=["RobertaForCausalLM"]), "lm_head.dense"),
        ("ModernBertDecoderConfig", dict(cls_token_id=0, sep_token_id=1), "lm_head.dense, lm_head.norm"),
    ],
)
def test_lm_head_with_transform_layers_is_refused(
    name: str, kwargs: dict[str, Any], layers: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """BERT-style decoder heads (dense + activation + norm before the vocabulary projection):
    refused before the model is built, naming the head's layers, instead of wrong logits."""
    import transformers as tf

    config = getattr(tf, name)(**COMMON | kwargs)
    message = _refused(config, "LM head has layers of its own before the output embedding", monkeypatch)
    assert layers in message, message


def test_plain_output_embedding_heads_are_accepted() -> None:
    """A head that is only the output embedding (and its tied bias) is not refused."""
    import transformers as tf

    from hallm.core.models.generic import generic_unsupported_reason

    for config in (
        tf.BertGenerationConfig(**COMMON, architectures=["BertGenerationDecoder"]),
        tf.PhiConfig(**COMMON),
        tf.OPTConfig(**COMMON),
    ):
        assert generic_unsupported_reason(config) is None, type(config).__name__
