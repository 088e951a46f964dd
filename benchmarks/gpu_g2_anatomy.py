"""Where G2's time goes: every engine step of a G2 run (Llama-3.1-8B, 1024 in / 1024 out, 192
resident requests, temperature 0.6) timed and classified, against the floor of the work it did.

G2's headline percentage (`gpu_g1.py --fixed-len`) divides the run's output tok/s by a decode-only
roofline: 192 requests resident at the mean context, every step streaming the weights and their
KV. The run also prefills every prompt, and with fixed lengths a wave of requests finishes
together and the next wave's prompts are prefilled with no decode to hide behind. This script
splits the run into those parts:

- each `LLMEngine.step` call is timed; with async scheduling a call waits for the step launched
  by the previous call, so its time is charged to that step (sync scheduling: to its own);
- a step is "decode" when every request in it computes one token, else "prefill" (prompt chunks,
  decode rows riding along);
- floors: a decode step moves the weights plus its requests' KV (`bytes / copy bandwidth`); a
  prefill step does `2 x body params x tokens` + causal attention + the lm_head for its sampled
  rows in FLOPs, at the bf16 GEMM rate measured in this process (`max(FLOP floor, bytes floor)`);
- the whole-workload roofline is the sum of the floors of the steps the run took.

    python3 benchmarks/gpu_g2_anatomy.py [--num-seqs 512] [--max-num-seqs 192] [--out DIR]
"""

from __future__ import annotations

import argparse
import collections
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.gpu_common import (
    append_jsonl,
    copy_bandwidth,
    environment,
    kv_bytes_per_token,
    model_config,
    weight_bytes_read,
    write_model_dir,
)
from benchmarks.variants import VARIANTS
from benchmarks.variants import apply as apply_variant


def gemm_rate(m: int = 8192, k: int = 4096, n: int = 14336) -> float:
    """bf16 FLOP/s of one large GEMM of the model's MLP shape (cuBLAS through torch)."""
    import torch
    import triton.testing

    a = torch.randn(m, k, dtype=torch.bfloat16, device="cuda")
    b = torch.randn(k, n, dtype=torch.bfloat16, device="cuda")
    ms = triton.testing.do_bench(lambda: a @ b, warmup=50, rep=300, return_mode="median")
    return 2 * m * k * n / (ms * 1e-3)


class StepLog:
    """Wraps a live engine's scheduler and step (benchmark instrumentation only): what each step
    scheduled, and how long each `step()` call took."""

    def __init__(self, engine: Any) -> None:
        self.engine = engine
        self.scheduled: list[dict[str, int]] = []
        self.calls: list[tuple[int, float]] = []  # (steps scheduled before the call, seconds)
        self._schedule = engine.scheduler.schedule
        self._step = engine.step
        engine.scheduler.schedule = self._logged_schedule
        engine.step = self._timed_step

    def _logged_schedule(self) -> Any:
        out = self._schedule()
        if out.total_num_scheduled_tokens:
            decode_rows = decode_ctx = 0
            for c in out.cached_requests:
                if out.num_scheduled_tokens.get(c.req_id) == 1:
                    decode_rows += 1
                    decode_ctx += c.num_computed_tokens + 1
            rows = len(out.num_scheduled_tokens)
            self.scheduled.append(
                {
                    "tokens": out.total_num_scheduled_tokens,
                    "rows": rows,
                    "decode_rows": decode_rows,
                    "decode_ctx": decode_ctx,
                    # prompt chunks: their tokens and the sum over tokens of their positions
                    "prefill_tokens": out.total_num_scheduled_tokens - decode_rows,
                    "prefill_pos": sum(
                        n * (r.num_computed_tokens + (n - 1) / 2)
                        for r in out.new_requests
                        if (n := out.num_scheduled_tokens[r.req_id])
                    )
                    + sum(
                        n * (c.num_computed_tokens + (n - 1) / 2)
                        for c in out.cached_requests
                        if (n := out.num_scheduled_tokens[c.req_id]) > 1
                    ),
                }
            )
        return out

    def _timed_step(self, *args: Any, **kwargs: Any) -> Any:
        before = len(self.scheduled)
        t0 = time.perf_counter()
        result = self._step(*args, **kwargs)
        self.calls.append((before, time.perf_counter() - t0))
        return result

    def step_times(self, async_scheduling: bool) -> list[float]:
        """Seconds per scheduled step. Async: a call's time is the wait for the step launched by
        the previous call (the last step is charged to the call that resolves it)."""
        times = [0.0] * len(self.scheduled)
        for before, secs in self.calls:
            idx = before - 1 if async_scheduling else before
            idx = min(max(idx, 0), len(times) - 1)
            if times:
                times[idx] += secs
        return times


def floors(name: str, steps: list[dict[str, int]], bw: float, flops: float) -> list[tuple[float, float]]:
    """(bytes floor, FLOP floor) in seconds per step."""
    c = model_config(name)
    h, v, layers = c.hidden_size, c.vocab_size, c.num_hidden_layers
    q_dim = c.num_attention_heads * (h // c.num_attention_heads)
    weights = weight_bytes_read(name)
    body_params = (weights / 2) - v * h  # streamed parameters without the lm_head
    kv_tok = kv_bytes_per_token(name)
    out = []
    for s in steps:
        kv_bytes = (s["decode_ctx"] + s["prefill_pos"] + s["prefill_tokens"]) * kv_tok
        sampled = s["decode_rows"] + max(0, s["rows"] - s["decode_rows"])
        flop = (
            2 * body_params * s["tokens"]
            + 4 * layers * q_dim * (s["decode_ctx"] + s["prefill_pos"])  # QK^T and PV
            + 2 * v * h * sampled
        )
        out.append(((weights + kv_bytes) / bw, flop / flops))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="llama-3.1-8b")
    p.add_argument("--num-seqs", type=int, default=512)
    p.add_argument("--input-len", type=int, default=1024)
    p.add_argument("--output-len", type=int, default=1024)
    p.add_argument("--max-num-seqs", type=int, default=192)
    p.add_argument("--max-num-batched-tokens", type=int, default=8192)
    p.add_argument("--temperature", type=float, default=0.6)
    p.add_argument("--device", default="cuda", help="cpu: only to check the script's plumbing")
    p.add_argument("--out", default="benchmarks/results/raw")
    p.add_argument(
        "--variant", default="shipped", choices=sorted(VARIANTS), help="an engine variant, for an A/B"
    )
    args = p.parse_args()
    if args.device == "cuda":
        apply_variant(args.variant)

    import torch

    from hallm.core.sampling_params import SamplingParams
    from hallm.entrypoints.llm import LLM

    on_gpu = args.device == "cuda"
    bw, rate = (copy_bandwidth(), gemm_rate()) if on_gpu else (20e9, 1e12)
    model_dir = write_model_dir(args.model, Path(tempfile.mkdtemp(prefix="hallm-g2a-")) / args.model)
    llm = LLM(
        model=str(model_dir),
        device=args.device,
        load_format="dummy",
        dtype="bfloat16" if on_gpu else "float32",
        max_model_len=args.input_len + args.output_len + 16,
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        seed=0,
    )
    engine = llm.engine
    async_on = bool(getattr(engine, "async_scheduling", False))
    rng = random.Random(0)
    vocab = model_config(args.model).vocab_size
    prompts = [
        {"prompt_token_ids": [rng.randrange(vocab) for _ in range(args.input_len)]}
        for _ in range(args.num_seqs)
    ]
    params = SamplingParams(
        temperature=args.temperature, max_tokens=args.output_len, ignore_eos=True, detokenize=False
    )
    # The same shapes once, short, so that nothing left to compile lands in the timed run.
    llm.generate(prompts[: args.max_num_seqs], SamplingParams(max_tokens=8, ignore_eos=True), use_tqdm=False)
    llm.reset_prefix_cache()
    if on_gpu:
        torch.cuda.synchronize()

    log = StepLog(engine)
    start = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    if on_gpu:
        torch.cuda.synchronize()
    wall = time.perf_counter() - start
    produced = sum(len(o.outputs[0].token_ids) for o in outs)
    times = log.step_times(async_on)
    fl = floors(args.model, log.scheduled, bw, rate)

    parts: dict[str, dict[str, float]] = collections.defaultdict(lambda: collections.defaultdict(float))
    by_batch: dict[int, list[float]] = collections.defaultdict(list)
    for s, t, (fb, ff) in zip(log.scheduled, times, fl, strict=True):
        kind = "decode" if s["prefill_tokens"] == 0 else "prefill"
        part = parts[kind]
        part["steps"] += 1
        part["seconds"] += t
        part["floor_s"] += max(fb, ff)
        part["tokens_out"] += s["decode_rows"]
        part["prompt_tokens"] += s["prefill_tokens"]
        if kind == "decode":
            by_batch[s["decode_rows"]].append(t / max(fb, 1e-12))
    workload_floor = sum(max(fb, ff) for fb, ff in fl)

    c = model_config(args.model)
    b = min(args.max_num_seqs, args.num_seqs)
    step_bytes = weight_bytes_read(args.model) + b * (
        args.input_len + args.output_len / 2
    ) * kv_bytes_per_token(args.model)
    decode_roofline = b / (step_bytes / bw)
    tok_s = produced / wall
    record: dict[str, Any] = {
        "benchmark": "g2-anatomy",
        "model": args.model,
        "variant": args.variant,
        "env": environment() if on_gpu else {},
        "copy_bw_gbps": bw / 1e9,
        "gemm_tflops": rate / 1e12,
        "async_scheduling": async_on,
        "wall_s": wall,
        "output_tokens": produced,
        "output_tok_s": tok_s,
        "decode_roofline_tok_s": decode_roofline,
        "pct_of_decode_roofline": 100 * tok_s / decode_roofline,
        "workload_floor_s": workload_floor,
        "pct_of_workload_roofline": 100 * workload_floor / wall,
        "steps_timed_s": sum(times),
        "parts": {k: dict(v) for k, v in parts.items()},
        "decode_step_over_floor_by_batch": {
            str(k): {"steps": len(v), "median": sorted(v)[len(v) // 2]} for k, v in sorted(by_batch.items())
        },
        "layers": c.num_hidden_layers,
    }
    append_jsonl(Path(args.out) / "g2_anatomy.jsonl", record)
    print(
        f"{args.model}: {args.num_seqs} requests {args.input_len}/{args.output_len}, max_num_seqs "
        f"{args.max_num_seqs}, temperature {args.temperature}, async scheduling {async_on}, variant {args.variant}"
    )
    print(f"copy BW {bw / 1e9:.0f} GB/s, bf16 GEMM {rate / 1e12:.0f} TFLOP/s (measured here)")
    print(
        f"wall {wall:.1f} s, {produced} output tokens, {tok_s:.0f} tok/s = "
        f"{record['pct_of_decode_roofline']:.1f}% of the decode roofline at {b} resident "
        f"({decode_roofline:.0f} tok/s); the steps' own floors sum to {workload_floor:.1f} s = "
        f"{record['pct_of_workload_roofline']:.1f}% of the wall time"
    )
    print(f"steps timed {sum(times):.1f} s of {wall:.1f} s wall")
    for kind, part in sorted(parts.items()):
        print(
            f"  {kind:8} {int(part['steps']):6d} steps {part['seconds']:7.2f} s  floor {part['floor_s']:7.2f} s "
            f"({part['seconds'] / max(part['floor_s'], 1e-9):.2f}x)  prompt tokens {int(part['prompt_tokens'])}, "
            f"output rows {int(part['tokens_out'])}"
        )
    print("  decode steps by batch: time / bytes floor (median)")
    for k, v in record["decode_step_over_floor_by_batch"].items():
        print(f"    batch {k:>4}: {v['steps']:5d} steps, {v['median']:.2f}x")


if __name__ == "__main__":
    main()
