"""Issue 3's CPU benchmark: hallm against HF `generate` in the same run, 128 in / 128 out.

For each model (SmolLM2-135M real weights; Qwen2.5-0.5B shapes with dummy weights), dtype
(fp32, bf16) and batch (1, 32), runs `hallm bench throughput` with `--backend hallm` and
`--backend hf`, each in its own subprocess, and prints output tok/s and the ratio. The batch-1
floor is (weight bytes streamed per token) / (copy bandwidth). This machine's bandwidth drifts
by up to +-20% within minutes, so for batch 1 a separate subprocess also times hallm's decode
step (128-token context, 128 steps, after the prefill) in three rounds, each between two
copy-bandwidth measurements, and reports the median round's step against the floor from the
mean of its two bandwidths.

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


def decode_step(model: str | None, dtype: str, extra: list[str]) -> dict:
    """Run `--decode-step` in a subprocess: hallm's batch-1 decode step and the copy bandwidth around it."""
    cmd = [sys.executable, __file__, "--decode-step", model or "", "--dtypes", dtype, *extra]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def measure_decode_step(model: str | None, dtype: str, dummy: bool, rounds: int = 3) -> None:
    """Print {"step_ms", "bw_gbs"}: the mean decode step of one 128-token request and the mean of
    the copy bandwidths measured just before and just after it, from the round (of `rounds`)
    whose step / floor ratio is the median."""
    from hallm import LLM, SamplingParams

    kwargs = {"load_format": "dummy", "skip_tokenizer_init": True} if dummy else {}
    llm = LLM(model=model or None, device="cpu", dtype=dtype, max_model_len=512, seed=0, **kwargs)
    prompt = [{"prompt_token_ids": [(7 * i) % 1000 + 10 for i in range(128)]}]

    def timed(n: int) -> float:
        t = time.perf_counter()
        llm.generate(prompt, SamplingParams(max_tokens=n, ignore_eos=True, temperature=0), use_tqdm=False)
        return time.perf_counter() - t

    timed(8)  # warm-up
    bws = [copy_bandwidth_gbs()]
    steps = []
    for _ in range(rounds):
        prefill = min(timed(1) for _ in range(3))
        steps.append((timed(129) - prefill) / 128)
        bws.append(copy_bandwidth_gbs())
    # floor ~ 1 / bandwidth, so step / floor ~ step * bandwidth
    runs = sorted((s * (bws[i] + bws[i + 1]) / 2, s, (bws[i] + bws[i + 1]) / 2) for i, s in enumerate(steps))
    _, step, bw = runs[len(runs) // 2]
    print(
        json.dumps(
            {"step_ms": step * 1e3, "bw_gbs": bw, "steps_ms": [x * 1e3 for x in steps], "bws_gbs": bws}
        )
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--decode-step", metavar="MODEL", help=argparse.SUPPRESS)
    parser.add_argument("--load-format", help=argparse.SUPPRESS)
    parser.add_argument("--skip-tokenizer-init", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--models", default="smollm2,qwen2.5-0.5b")
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--batches", default="1,32")
    args = parser.parse_args()
    if args.decode_step is not None:
        measure_decode_step(args.decode_step, args.dtypes, dummy=args.load_format == "dummy")
        return
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
            weight_bytes = streamed_weight_bytes(model_dir, dtype)
            floor = bw * 1e9 / weight_bytes
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
                if batch == 1:
                    d = decode_step(path, dtype, extra)
                    floor_ms = weight_bytes / (d["bw_gbs"] * 1e9) * 1e3
                    row["decode_step_ms"] = round(d["step_ms"], 2)
                    row["decode_floor_ms"] = round(floor_ms, 2)
                    row["decode_floor_ratio"] = round(d["step_ms"] / floor_ms, 2)
                    row["decode_rounds_ms"] = [round(x, 2) for x in d["steps_ms"]]
                    row["decode_rounds_bw_gbs"] = [round(x, 1) for x in d["bws_gbs"]]
                rows.append(row)
                print(json.dumps(row), flush=True)
    print(
        "\n| model | dtype | batch | hallm out tok/s | HF generate out tok/s | hallm/HF | batch-1 floor tok/s "
        "| floor/hallm | decode step ms | its floor ms | step/floor |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['model']} | {r['dtype']} | {r['batch']} | {r['hallm_out_tok_s']} | {r['hf_out_tok_s']} | "
            f"{r['ratio']} | {r['floor_tok_s'] or '-'} | {r['floor_ratio'] or '-'} | {r.get('decode_step_ms', '-')} "
            f"| {r.get('decode_floor_ms', '-')} | {r.get('decode_floor_ratio', '-')} |"
        )


if __name__ == "__main__":
    main()
