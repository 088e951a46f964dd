"""Tiny random models of each supported architecture, saved as real HF directories.

Each directory holds config.json, generation_config.json, model.safetensors and a trained
byte-level BPE tokenizer (vocab ~512, <|bos|>/<|eos|>/<|pad|> specials, a small chat template),
so it loads through every path a real checkpoint does (hallm's loader, AutoTokenizer,
AutoModelForCausalLM) with no hub access.

Weights are re-drawn with a larger scale than HF's init (std 0.1, norm weights 1 +- 0.1): with
std 0.02 attention is nearly uniform and norms are exactly 1, which would hide rope, masking
and norm-loading bugs.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import torch

BOS, EOS, PAD = "<|bos|>", "<|eos|>", "<|pad|>"
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{{ eos_token }}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)

#: Architectures with a native hallm implementation ("llama3": Llama with llama3 rope scaling,
#: biases on attention and MLP).
NATIVE_ARCHS = ("llama", "llama3", "mistral", "qwen2", "qwen3")
#: Architectures hallm runs through the generic transformers path.
GENERIC_ARCHS = ("gpt_neox", "phi", "gemma2")
#: Mixture-of-experts families (native): 4 experts, 2 per token, expert intermediate 32.
MOE_ARCHS = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe")
#: Long-rope with a small original context (16), so test prompts cross it.
LONGROPE_ARCHS = ("llama_longrope", "phi3_longrope")
ALL_ARCHS = NATIVE_ARCHS + GENERIC_ARCHS

_TEXT = """\
The quick brown fox jumps over the lazy dog. A paged attention engine keeps keys and values in
fixed-size blocks, and every request owns a block table that maps its positions to blocks.
The capital of France is Paris. The capital of Italy is Rome. The capital of Spain is Madrid.
Once upon a time there was a small model that learned to count: one, two, three, four, five,
six, seven, eight, nine, ten. It liked numbers such as 12, 345 and 6789, and symbols like
(a + b) * c = d, x[i] -> y{j}, "quotes" and 'apostrophes'; it also liked lists: apples,
oranges, pears, plums. Continuous batching schedules prefill and decode tokens together, and
chunked prefill splits long prompts so that decode steps keep flowing. Hello, world! How are
you today? I am fine, thank you. What is the weather like? It is sunny and warm outside.
def add(a, b):\n    return a + b\n\nfor i in range(10):\n    print(i * i)\n
Ünïcödé text: café, naïve, smörgåsbord, 東京, Москва, 🙂.
"""


@functools.lru_cache(maxsize=1)
def _tokenizer_object(vocab_size: int) -> Any:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[BOS, EOS, PAD],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([_TEXT] * 4, trainer=trainer)
    return tok


def build_tokenizer(vocab_size: int = 512) -> Any:
    """A trained byte-level BPE `PreTrainedTokenizerFast` (ids 0/1/2 = bos/eos/pad)."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_tokenizer_object(vocab_size).to_str()),
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
    )
    tok.chat_template = CHAT_TEMPLATE
    return tok


def tiny_config(arch: str, vocab_size: int) -> Any:
    """A transformers config of `arch` (see ALL_ARCHS): hidden 64, 2 layers, 4 heads, 2 KV heads."""
    import transformers as tf

    common: dict[str, Any] = dict(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=2,
        dtype="float32",
    )
    if arch == "llama":
        return tf.LlamaConfig(**common, tie_word_embeddings=False)
    if arch == "llama3":
        rope = {
            "rope_type": "llama3",
            "rope_theta": 10000.0,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 32,
        }
        return tf.LlamaConfig(**common, rope_parameters=rope, attention_bias=True, mlp_bias=True)
    if arch == "mistral":
        # A window shorter than the test prompts, so the window is exercised.
        return tf.MistralConfig(**common, sliding_window=8, tie_word_embeddings=False)
    if arch == "qwen2":
        return tf.Qwen2Config(**common, tie_word_embeddings=True)
    if arch == "qwen3":
        # head_dim 32 != hidden/heads (16): the config's explicit head_dim must win.
        return tf.Qwen3Config(**common, head_dim=32, tie_word_embeddings=True)
    if arch == "gpt_neox":
        neox = {k: v for k, v in common.items() if k != "num_key_value_heads"}
        rope = {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5}
        return tf.GPTNeoXConfig(**neox, rope_parameters=rope, tie_word_embeddings=False)
    if arch == "phi":
        rope = {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5}
        return tf.PhiConfig(**common, rope_parameters=rope, qk_layernorm=True)
    if arch == "gemma2":
        # Alternating sliding/full layers, attention and final logit soft-capping, head_dim 32.
        return tf.Gemma2Config(
            **common, head_dim=32, sliding_window=8, attn_logit_softcapping=5.0, final_logit_softcapping=3.0
        )
    if arch in LONGROPE_ARCHS:
        half = common["hidden_size"] // common["num_attention_heads"] // 2
        rope = {
            "rope_type": "longrope",
            "rope_theta": 10000.0,
            "short_factor": [1.0 + 0.05 * i for i in range(half)],
            "long_factor": [1.5 + 0.4 * i for i in range(half)],
            "factor": common["max_position_embeddings"] / 16,
            "original_max_position_embeddings": 16,
        }
        if arch == "llama_longrope":
            return tf.LlamaConfig(**common, rope_parameters=rope, tie_word_embeddings=False)
        return tf.Phi3Config(**common, rope_parameters=rope, original_max_position_embeddings=16)
    if arch == "gpt_oss":
        # Attention sinks, alternating sliding (window 8) / full layers, yarn rope, biased router
        # and experts with gpt-oss's clamped SwiGLU.
        return tf.GptOssConfig(
            **{**common, "intermediate_size": 32, "head_dim": 16},
            num_local_experts=4,
            num_experts_per_tok=2,
            sliding_window=8,
            layer_types=["sliding_attention", "full_attention"],
            rope_parameters={
                "rope_type": "yarn",
                "rope_theta": 150000.0,
                "factor": 4.0,
                "original_max_position_embeddings": 64,
                "beta_fast": 32.0,
                "beta_slow": 1.0,
                "truncate": False,
            },
            tie_word_embeddings=False,
        )
    moe: dict[str, Any] = dict(num_experts_per_tok=2, moe_intermediate_size=32)
    if arch == "mixtral":
        return tf.MixtralConfig(
            **{**common, "intermediate_size": 32}, num_local_experts=4, num_experts_per_tok=2
        )
    if arch == "qwen2_moe":
        # Layer 1 dense (mlp_only_layers), layer 0 sparse with a shared expert; top-k not renormalized.
        return tf.Qwen2MoeConfig(
            **common, **moe, num_experts=4, shared_expert_intermediate_size=48, mlp_only_layers=[1]
        )
    if arch == "qwen3_moe":
        return tf.Qwen3MoeConfig(**common, **moe, num_experts=4, head_dim=32, norm_topk_prob=True)
    if arch == "olmoe":
        return tf.OlmoeConfig(
            **{**common, "intermediate_size": 32}, num_experts=4, num_experts_per_tok=2, clip_qkv=0.5
        )
    raise ValueError(f"unknown tiny arch {arch!r}; known: {ALL_ARCHS + MOE_ARCHS + LONGROPE_ARCHS}")


@torch.no_grad()
def _redraw(model: torch.nn.Module, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        noise = torch.randn(p.shape, generator=gen) * 0.1
        is_norm = p.ndim == 1 and ("norm" in name or "layernorm" in name) and not name.endswith("bias")
        if name.endswith(".sinks"):  # attention sinks: logits that matter next to the scores
            p.copy_(noise * 20.0)
            continue
        p.copy_(1.0 + noise if is_norm else noise)


def build_tiny_model(arch: str, out_dir: str | Path, seed: int = 0, **overrides: Any) -> Path:
    """Write a tiny random `arch` model + tokenizer as an HF directory at `out_dir`; return it.
    `overrides` set config fields (e.g. num_key_value_heads=1)."""
    from transformers import AutoModelForCausalLM

    out = Path(out_dir)
    tokenizer = build_tokenizer()
    config = tiny_config(arch, vocab_size=len(tokenizer))
    for key, value in overrides.items():
        setattr(config, key, value)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    _redraw(model, seed)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out
