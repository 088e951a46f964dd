"""Shared pieces of the GPU benchmarks: model shapes built from transformers' config classes (no
hub), model directories with dummy weights, the G1 workload, and environment facts for reports."""

from __future__ import annotations

import json
import os
import platform
import random
import subprocess
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

MODELS = ("qwen2.5-0.5b", "llama-3.1-8b", "qwen3-30b-a3b", "tiny")


def model_config(name: str) -> Any:
    """The real model's shapes (from its published config.json), as a transformers config."""
    import transformers as tf

    if name == "qwen2.5-0.5b":
        return tf.Qwen2Config(
            vocab_size=151936,
            hidden_size=896,
            intermediate_size=4864,
            num_hidden_layers=24,
            num_attention_heads=14,
            num_key_value_heads=2,
            max_position_embeddings=32768,
            rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
            rms_norm_eps=1e-6,
            tie_word_embeddings=True,
            bos_token_id=151643,
            eos_token_id=151643,
            dtype="bfloat16",
        )
    if name == "llama-3.1-8b":
        return tf.LlamaConfig(
            vocab_size=128256,
            hidden_size=4096,
            intermediate_size=14336,
            num_hidden_layers=32,
            num_attention_heads=32,
            num_key_value_heads=8,
            max_position_embeddings=131072,
            rope_parameters={
                "rope_type": "llama3",
                "rope_theta": 500000.0,
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192,
            },
            rms_norm_eps=1e-5,
            tie_word_embeddings=False,
            bos_token_id=128000,
            eos_token_id=128001,
            dtype="bfloat16",
        )
    if name == "qwen3-30b-a3b":  # 128 experts, 8 active per token: ~3.3 B of 30.5 B parameters
        return tf.Qwen3MoeConfig(
            vocab_size=151936,
            hidden_size=2048,
            intermediate_size=6144,
            moe_intermediate_size=768,
            num_hidden_layers=48,
            num_attention_heads=32,
            num_key_value_heads=4,
            head_dim=128,
            num_experts=128,
            num_experts_per_tok=8,
            norm_topk_prob=True,
            max_position_embeddings=40960,
            rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
            rms_norm_eps=1e-6,
            tie_word_embeddings=False,
            bos_token_id=151643,
            eos_token_id=151645,
            dtype="bfloat16",
        )
    if name == "tiny":  # for checking the scripts' plumbing on a CPU
        return tf.LlamaConfig(
            vocab_size=10240,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=4096,
            tie_word_embeddings=False,
            bos_token_id=0,
            eos_token_id=1,
            dtype="float32",
        )
    raise ValueError(f"unknown model {name!r}; known: {MODELS}")


def write_model_dir(name: str, path: Path, cover_vocab: bool = False) -> Path:
    """config.json + a tokenizer: by default a small one (needed to load; token ids in, ids out),
    with `cover_vocab` one whose vocabulary is the model's (`covering_tokenizer`), so that every
    id a dummy-weight model samples decodes to text (served benchmarks time text chunks)."""
    from tests.utils.tiny_models import build_tokenizer

    path.mkdir(parents=True, exist_ok=True)
    config = model_config(name)
    config.save_pretrained(path)
    tok = covering_tokenizer(config.vocab_size) if cover_vocab else build_tokenizer()
    tok.save_pretrained(path)
    return path


def covering_tokenizer(vocab_size: int) -> Any:
    """A byte-level BPE tokenizer of exactly `vocab_size` ids, each of which decodes to text.

    Ids 0-2 are the specials <|bos|>/<|eos|>/<|pad|> (as the small tokenizer's), 3-258 the 256
    single bytes (so any text encodes), and the rest distinct words (" a", " b", ..., " aa", ...):
    no merges are needed to decode, and nothing is trained."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from tests.utils.tiny_models import BOS, CHAT_TEMPLATE, EOS, PAD

    byte_chars = pre_tokenizers.ByteLevel.alphabet()
    specials = [BOS, EOS, PAD]
    vocab = {t: i for i, t in enumerate(specials + sorted(byte_chars))}
    if vocab_size < len(vocab):
        raise ValueError(f"vocab_size must be at least {len(vocab)}, got {vocab_size}")
    letters = "abcdefghijklmnopqrstuvwxyz"
    n = 0
    while len(vocab) < vocab_size:
        word, k = "", n
        while True:  # bijective base 26: a..z, aa..zz, ...
            word = letters[k % 26] + word
            k = k // 26 - 1
            if k < 0:
                break
        vocab["\u0120" + word] = len(vocab)  # \u0120 is the byte-level alphabet's space
        n += 1
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(specials)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD)
    fast.chat_template = CHAT_TEMPLATE
    return fast


def weight_bytes_read(name: str, dtype_bytes: int = 2) -> int:
    """Bytes of weights one decode step streams: every parameter except the embedding (rows are
    gathered), plus the lm_head (read in full, also when tied to the embedding)."""
    c = model_config(name)
    if getattr(c, "num_experts", None):
        raise ValueError(f"{name} is a mixture of experts: the bytes a step reads depend on the routing")
    h, v, i, n = c.hidden_size, c.vocab_size, c.intermediate_size, c.num_hidden_layers
    d = h // c.num_attention_heads
    q, kv = c.num_attention_heads * d, c.num_key_value_heads * d
    bias = (q + 2 * kv) if "qwen" in name else 0
    per_layer = h * (q + 2 * kv) + bias + q * h + 3 * h * i + 2 * h
    return dtype_bytes * (n * per_layer + h + v * h)


def kv_bytes_per_token(name: str, dtype_bytes: int = 2) -> int:
    c = model_config(name)
    d = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    return 2 * c.num_hidden_layers * c.num_key_value_heads * d * dtype_bytes


def g1_workload(num_seqs: int = 256, seed: int = 0) -> tuple[list[list[int]], list[int]]:
    """nano-vllm's bench.py workload: prompt ids U[0, 10000], lengths and max_tokens U[100, 1024]."""
    rng = random.Random(seed)
    prompts = [[rng.randint(0, 10000) for _ in range(rng.randint(100, 1024))] for _ in range(num_seqs)]
    outputs = [rng.randint(100, 1024) for _ in range(num_seqs)]
    return prompts, outputs


def environment() -> dict[str, Any]:
    """Device, driver and library versions, for the results file."""
    info: dict[str, Any] = {"python": platform.python_version()}
    try:
        import torch

        info["torch"] = torch.__version__
        info["cuda_runtime"] = torch.version.cuda
        if torch.cuda.is_available():
            props = torch.cuda.get_device_properties(0)
            info["device"] = props.name
            info["sm"] = f"{props.major}.{props.minor}"
            info["multiprocessors"] = props.multi_processor_count
            info["memory_gib"] = round(props.total_memory / 2**30, 1)
    except Exception as exc:  # pragma: no cover - report what we can
        info["torch_error"] = repr(exc)
    for mod in ("triton", "transformers"):
        try:
            info[mod] = __import__(mod).__version__
        except Exception:
            info[mod] = None
    try:
        smi = subprocess.run(
            [
                "nvidia-smi",
                "--query-gpu=name,driver_version,clocks.max.sm,clocks.max.mem",
                "--format=csv,noheader",
            ],
            capture_output=True,
            text=True,
            timeout=20,
            check=False,
        )
        info["nvidia_smi"] = smi.stdout.strip()
    except Exception:
        info["nvidia_smi"] = None
    return info


def append_jsonl(path: Path, record: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def copy_bandwidth(num_bytes: int = 1 << 30) -> float:
    """Measured device-to-device copy bandwidth in bytes/s, counting bytes read plus written."""
    import torch
    import triton.testing

    x = torch.empty(num_bytes, dtype=torch.uint8, device="cuda")
    x.random_(0, 255)
    y = torch.empty_like(x)
    ms = triton.testing.do_bench(lambda: y.copy_(x), warmup=50, rep=300, return_mode="median")
    return 2 * num_bytes / (ms * 1e-3)
