"""Issue 3's CPU benchmark: hallm against HF `generate` in the same run, 128 in / 128 out.

For each model (SmolLM2-135M real weights; Qwen2.5-0.5B shapes with dummy weights), dtype
(fp32, bf16) and batch (1, 32), runs `hallm bench throughput` with `--backend hallm` and
`--backend hf`, each in its own subprocess, and prints output tok/s and the ratio. The batch-1
floor is (weight bytes streamed per token) / (copy bandwidth measured at the start of the run).

    .venv/bin/python benchmarks/cpu_engine.py [--quick] [--models smollm2,qwen2.5-0.5b]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def copy_bandwidth_gbs(size_mb: int = 512, repeats: int = 10) -> float:
    """STREAM-style copy bandwidth: (bytes read + bytes written) / time, best of `repeats`."""
    import torch

    a = torch.ones(size_mb * 2**20 // 4)
    b = torch.empty_like(a)
    b.copy_(a)
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        b.copy_(a)
        best = min(best, time.perf_counter() - t)
    return 2 * a.numel() * 4 / best / 1e9


def streamed_weight_bytes(model_dir: str, dtype: str) -> int:
    """Bytes of weights a decode step must read: every parameter but the embedding gather
    (a tied LM head still streams the embedding matrix once)."""
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(model_dir)
    h, inter, layers, vocab = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers, cfg.vocab_size
    heads, kv = cfg.num_attention_heads, cfg.num_key_value_heads
    head_dim = getattr(cfg, "head_dim", None) or h // heads
    attn = h * head_dim * heads * 2 + h * head_dim * kv * 2
    mlp = 3 * h * inter
    params = layers * (attn + mlp) + vocab * h  # + the LM head
    return params * (4 if dtype == "float32" else 2)


def run_bench(model: str | None, backend: str, dtype: str, batch: int, extra: list[str]) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        out = f.name
    cmd = [sys.executable, "-m", "hallm.entrypoints.cli", "--log-level", "warning", "bench", "throughput"]
    cmd += [model] if model else []
    cmd += [
        "--device",
        "cpu",
        "--backend",
        backend,
        "--dtype",
        dtype,
        "--input-len",
        "128",
        "--output-len",
        "128",
    ]
    cmd += ["--num-prompts", str(batch), "--max-num-seqs", str(batch), "--hf-max-batch-size", str(batch)]
    cmd += ["--output-json", out, *extra]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    with open(out) as f:
        result = json.load(f)
    os.unlink(out)
    return result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--models", default="smollm2,qwen2.5-0.5b")
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--batches", default="1,32")
    args = parser.parse_args()
    from gpu_common import model_config

    from hallm.core.model_loader import resolve_model

    bw = copy_bandwidth_gbs()
    print(f"copy bandwidth: {bw:.1f} GB/s (read + write)")
    tmp = tempfile.mkdtemp()
    rows = []
    for model in args.models.split(","):
        if model == "smollm2":
            path, extra, model_dir = None, [], resolve_model(None).model_dir
        else:
            path = os.path.join(tmp, model)
            model_config(model).save_pretrained(path)  # the same shapes the GPU benchmarks use
            extra, model_dir = ["--load-format", "dummy", "--skip-tokenizer-init"], path
        for dtype in args.dtypes.split(","):
            floor = bw * 1e9 / streamed_weight_bytes(model_dir, dtype)
            for batch in (int(b) for b in args.batches.split(",")):
                h = run_bench(path, "hallm", dtype, batch, extra)
                f = run_bench(path, "hf", dtype, batch, extra)
                row = {
                    "model": model,
                    "dtype": dtype,
                    "batch": batch,
                    "hallm_out_tok_s": round(h["output_tokens_per_s"], 1),
                    "hf_out_tok_s": round(f["output_tokens_per_s"], 1),
                    "ratio": round(h["output_tokens_per_s"] / f["output_tokens_per_s"], 2),
                    "floor_tok_s": round(floor, 1) if batch == 1 else None,
                    "floor_ratio": round(floor / h["output_tokens_per_s"], 2) if batch == 1 else None,
                }
                rows.append(row)
                print(json.dumps(row), flush=True)
    print(
        "\n| model | dtype | batch | hallm out tok/s | HF generate out tok/s | hallm/HF | batch-1 floor tok/s | floor/hallm |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['model']} | {r['dtype']} | {r['batch']} | {r['hallm_out_tok_s']} | {r['hf_out_tok_s']} | "
            f"{r['ratio']} | {r['floor_tok_s'] or '-'} | {r['floor_ratio'] or '-'} |"
        )


if __name__ == "__main__":
    main()
