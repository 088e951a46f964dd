"""Tiny random llama and qwen2 checkpoints for the L2/L3 tests, built on the fly.

Each is a real HF directory (config.json, model.safetensors, a trained byte-level BPE
tokenizer), made with transformers' own config classes, so it loads through the engine's
normal path and nothing comes from a hub. The head size is a parameter: a device whose
kernels serve only some head sizes (64 and 128, say) gets a model it can serve. Weights are
drawn with std 0.1 (norm weights 1 +- 0.1) so attention is far from uniform and logits are not
flat, as in the core's tests.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

#: The architectures of the L3 comparison (two families hallm serves natively).
ARCHS = ("llama", "qwen2")
NUM_HEADS, NUM_KV_HEADS, NUM_LAYERS = 4, 2, 2
MAX_POSITIONS = 256

_TEXT = (
    "The quick brown fox jumps over the lazy dog. A paged attention engine keeps keys and values "
    "in fixed-size blocks, and every request owns a block table. The capital of France is Paris. "
    "One, two, three, four, five, six, seven, eight, nine, ten. Hello, world! How are you today? "
    "def add(a, b):\n    return a + b\n\nfor i in range(10):\n    print(i * i)\n"
)


@functools.lru_cache(maxsize=1)
def _trained_tokenizer_json(vocab_size: int) -> str:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|bos|>", "<|eos|>", "<|pad|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([_TEXT] * 4, trainer=trainer)
    return str(tok.to_str())


def build_tokenizer(vocab_size: int = 512) -> Any:
    """A trained byte-level BPE tokenizer (ids 0/1/2 = bos/eos/pad)."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(  # type: ignore[no-untyped-call]
        tokenizer_object=Tokenizer.from_str(_trained_tokenizer_json(vocab_size)),
        bos_token="<|bos|>",
        eos_token="<|eos|>",
        pad_token="<|pad|>",
    )


def tiny_config(arch: str, head_size: int, vocab_size: int) -> Any:
    """A transformers config: 2 layers, 4 query heads, 2 KV heads of `head_size`."""
    import transformers as tf

    hidden = NUM_HEADS * head_size
    common: dict[str, Any] = dict(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=NUM_LAYERS,
        num_attention_heads=NUM_HEADS,
        num_key_value_heads=NUM_KV_HEADS,
        head_dim=head_size,
        max_position_embeddings=MAX_POSITIONS,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=2,
        dtype="float32",
    )
    if arch == "llama":
        return tf.LlamaConfig(**common, tie_word_embeddings=False)
    if arch == "qwen2":
        return tf.Qwen2Config(**common, tie_word_embeddings=True)
    raise ValueError(f"unknown tiny arch {arch!r}; known: {ARCHS}")


def build_tiny_model(arch: str, out_dir: str | Path, head_size: int = 64, seed: int = 0) -> Path:
    """Write a tiny random `arch` model plus tokenizer as an HF directory; return it."""
    import torch
    from transformers import AutoModelForCausalLM

    out = Path(out_dir)
    tokenizer = build_tokenizer()
    config = tiny_config(arch, head_size, vocab_size=len(tokenizer))
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)  # type: ignore[no-untyped-call]
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen) * 0.1
            is_norm = p.ndim == 1 and "norm" in name and not name.endswith("bias")
            p.copy_(1.0 + noise if is_norm else noise)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out
