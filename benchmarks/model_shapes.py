"""Real model shapes as HF config directories (config.json only) for dummy-weight benchmarks.

Built with transformers' own config classes, so nothing is downloaded.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


def qwen2_5_0_5b() -> Any:
    from transformers import Qwen2Config

    return Qwen2Config(
        vocab_size=151936,
        hidden_size=896,
        intermediate_size=4864,
        num_hidden_layers=24,
        num_attention_heads=14,
        num_key_value_heads=2,
        max_position_embeddings=32768,
        rope_theta=1000000.0,
        rms_norm_eps=1e-6,
        tie_word_embeddings=True,
        architectures=["Qwen2ForCausalLM"],
        dtype="bfloat16",
    )


def llama_3_1_8b() -> Any:
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=128256,
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        max_position_embeddings=131072,
        rope_theta=500000.0,
        rms_norm_eps=1e-5,
        rope_scaling={
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        },
        tie_word_embeddings=False,
        architectures=["LlamaForCausalLM"],
        dtype="bfloat16",
    )


SHAPES = {"qwen2.5-0.5b": qwen2_5_0_5b, "llama-3.1-8b": llama_3_1_8b}


def write_shape(name: str, root: str | Path) -> Path:
    """Write `name`'s config.json under `root/name` and return the directory."""
    out = Path(root) / name
    out.mkdir(parents=True, exist_ok=True)
    SHAPES[name]().save_pretrained(out)
    return out
