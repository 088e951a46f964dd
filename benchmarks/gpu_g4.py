"""G4: decode against the memory roofline, and the attention kernel's achieved bandwidth.

copy      device-to-device copy bandwidth (bytes read + written): the roofline's BW
attention paged_attention alone (KV write excluded), bf16, random block order: KV bytes read
          (B x ctx x 2 x kv_heads x head_size x 2) / time, as % of the copy BW; the time two
          ways: one launch of back-to-back CUDA-graph replays (launch gaps included), and the
          kernels' own device time from the profiler (L2 flushed before each call, PDL off).
          Llama-3-8B (32/8x128) and Qwen2.5-0.5B (14/2x64) heads; batch 64 at 1k and 4k
          context, batch 1 long contexts (split-KV); `--sweep` also tries segment counts,
          `--sweep-tiles` tile lengths, warps and pipeline stages for Qwen2.5-0.5B,
          `--sweep-merge` the split-KV merge's chunk and the fewest tiles per segment.
step      decode step time of the whole engine (hallm LLM.generate, graphs on) at batch
          1/32/128 with ~1k context, vs the floor (weights + KV bytes) / copy BW; also the
          GPU time of one replay of the captured decode graph.

  python benchmarks/gpu_g4.py --out benchmarks/results/raw [--models qwen2.5-0.5b,llama-3.1-8b] [--sweep]
"""

from __future__ import annotations

import argparse
import json
import subprocess
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
    weight_bytes_read,
    write_model_dir,
)
from benchmarks.variants import VARIANTS
from benchmarks.variants import apply as apply_variant

SHAPES = {"llama-3.1-8b": (32, 8, 128), "qwen2.5-0.5b": (14, 2, 64)}


def attention_case(
    shape: tuple[int, int, int],
    batch: int,
    ctx: int,
    *,
    split: bool | None = None,
    config: Any = None,
    segments: int | None = None,
    merge_in_kernel: bool | None = None,
    min_segment_tiles: int | None = None,
) -> dict[str, Any]:
    import dataclasses

    import torch
    import triton.testing
    from hallm_cuda.platform import CudaPlatform

    from hallm.ops.triton import paged_attention

    target = CudaPlatform().triton_target()  # what the engine launches with (PDL on sm_90+)

    heads, kv_heads, head_size = shape
    block = 16
    blocks_per = -(-ctx // block)
    num_blocks = batch * blocks_per + 1
    gen = torch.Generator(device="cuda").manual_seed(0)
    cache = torch.randn(
        (2, num_blocks, block, kv_heads, head_size), device="cuda", dtype=torch.bfloat16, generator=gen
    )
    perm = torch.randperm(num_blocks - 1, device="cuda", generator=gen).to(torch.int32) + 1
    tables = perm.view(batch, blocks_per)
    q = torch.randn((batch, heads, head_size), device="cuda", dtype=torch.bfloat16, generator=gen)
    qsl = torch.arange(batch + 1, device="cuda", dtype=torch.int32)
    seq_lens = torch.full((batch,), ctx, device="cuda", dtype=torch.int32)
    out = torch.empty_like(q)
    workspace: dict = {}

    def fn(target: Any = target) -> None:
        paged_attention(
            q,
            cache,
            qsl,
            seq_lens,
            tables,
            max_query_len=1,
            scale=head_size**-0.5,
            out=out,
            split_kv=split,
            workspace=workspace,
            config=config,
            num_segments=segments,
            merge_in_kernel=merge_in_kernel,
            min_segment_tiles=min_segment_tiles,
            target=target,
        )

    fn()
    torch.cuda.synchronize()
    ms = triton.testing.do_bench_cudagraph(fn, rep=100, return_mode="median")
    # without PDL, so no kernel is timed while it waits on the one before
    kernel_us = profiled_kernel_us(lambda: fn(dataclasses.replace(target, pdl=False)))
    kv_bytes = batch * ctx * 2 * kv_heads * head_size * 2
    return {
        "ms": ms,
        "kv_bytes": kv_bytes,
        "gbps": kv_bytes / (ms * 1e-3) / 1e9,
        "kernel_us": kernel_us,
        "kernel_gbps": kv_bytes / (kernel_us * 1e-6) / 1e9,
    }


def profiled_kernel_us(fn: Any, iters: int = 30) -> float:
    """Median device time of the kernels one `fn()` launches (attention, and the split-KV reduce
    when there is one), from the profiler's kernel records: each call after a 256 MB write that
    evicts the KV from L2 (`fn` launches without PDL)."""
    import statistics

    import torch
    from torch.profiler import ProfilerActivity, profile

    flush = torch.empty(256 << 20, dtype=torch.int8, device="cuda")
    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            flush.zero_()
            fn()
        torch.cuda.synchronize()
    per_kernel: dict[str, list[float]] = {}
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA and (
            "_attention_kernel" in e.name or "_reduce_kernel" in e.name
        ):
            per_kernel.setdefault(e.name, []).append(e.device_time)
    return sum(statistics.median(v) for v in per_kernel.values())


def bench_attention(bw: float, sweep: bool) -> list[dict[str, Any]]:
    rows = []
    cases = [
        ("llama-3.1-8b", 64, 1024),
        ("llama-3.1-8b", 64, 4096),
        ("llama-3.1-8b", 1, 4096),
        ("llama-3.1-8b", 1, 32768),
        ("llama-3.1-8b", 16, 4096),
        ("llama-3.1-8b", 128, 1024),
        ("qwen2.5-0.5b", 64, 1024),
        ("qwen2.5-0.5b", 64, 4096),
        ("qwen2.5-0.5b", 128, 1024),
        ("qwen2.5-0.5b", 32, 1024),
        ("qwen2.5-0.5b", 1, 1024),
    ]
    from hallm.ops.triton.launch_config import use_split_kv

    for model, batch, ctx in cases:
        split = use_split_kv(batch, SHAPES[model][1], 1)
        # split-KV steps: the launcher's choice, then each merge forced and the fewest tiles
        # per segment moved, for an A/B
        variants: list[tuple[str, dict[str, Any]]] = [("default", {})]
        if split:
            variants += [
                ("merge=in kernel", {"merge_in_kernel": True}),
                ("merge=reduce kernel", {"merge_in_kernel": False}),
                ("min tiles=1", {"min_segment_tiles": 1}),
                ("min tiles=4", {"min_segment_tiles": 4}),
            ]
        for config, kw in variants:
            r = attention_case(SHAPES[model], batch, ctx, **kw)
            r.update(
                model=model,
                batch=batch,
                ctx=ctx,
                split=split,
                config=config,
                pct_of_copy_bw=100 * r["gbps"] * 1e9 / bw,
            )
            rows.append(r)
            r["kernel_pct_of_copy_bw"] = 100 * r["kernel_gbps"] * 1e9 / bw
            print(
                f"attention {model:13} B={batch:3} ctx={ctx:5} split={split!s:5} {config:20} "
                f"{r['ms'] * 1e3:8.1f} us {r['gbps']:7.0f} GB/s {r['pct_of_copy_bw']:5.1f}% of copy BW "
                f"| profiled kernel {r['kernel_us']:6.1f} us {r['kernel_pct_of_copy_bw']:5.1f}%",
                flush=True,
            )
    if sweep:  # split-KV segments (the tile-shape sweep is in benchmarks/results/gpu.md)
        for model, batch, ctx in (
            ("qwen2.5-0.5b", 64, 1024),
            ("qwen2.5-0.5b", 128, 1024),
            ("qwen2.5-0.5b", 32, 1024),
            ("llama-3.1-8b", 16, 4096),
            ("llama-3.1-8b", 32, 1024),
        ):
            for segments in (1, 2, 4, 8, 16):
                r = attention_case(SHAPES[model], batch, ctx, split=segments > 1, segments=segments)
                r.update(
                    model=model,
                    batch=batch,
                    ctx=ctx,
                    split=segments > 1,
                    config=f"segments={segments}",
                    pct_of_copy_bw=100 * r["gbps"] * 1e9 / bw,
                )
                rows.append(r)
                print(
                    f"segments {model:13} B={batch:3} ctx={ctx:5} segments={segments:2} {r['ms'] * 1e3:8.1f} us "
                    f"{r['gbps']:7.0f} GB/s {r['pct_of_copy_bw']:5.1f}%",
                    flush=True,
                )
    return rows


def sweep_tiles(bw: float) -> list[dict[str, Any]]:
    """Qwen2.5-0.5B decode attention (batch 64; 1k and 4k context) over tile length, warps,
    pipeline stages and split-KV segments: the tuning behind `launch_config.kernel_config`."""
    from hallm.ops.triton.launch_config import KernelConfig

    rows = []
    for batch, ctx in ((64, 1024), (64, 4096)):
        for tile_n in (64, 128, 256):
            for warps in (2, 4):
                for stages in (2, 3, 4):
                    for segments in (2, 4, 8):
                        cfg = KernelConfig(block_m=16, tile_n=tile_n, num_warps=warps, num_stages=stages)
                        try:
                            r = attention_case(
                                SHAPES["qwen2.5-0.5b"], batch, ctx, split=True, config=cfg, segments=segments
                            )
                        except Exception as exc:  # e.g. out of shared memory for this shape
                            print(f"tiles B={batch} ctx={ctx} {cfg} segments={segments}: {exc!r:.120}")
                            continue
                        name = f"tile_n={tile_n} warps={warps} stages={stages} segments={segments}"
                        r.update(model="qwen2.5-0.5b", batch=batch, ctx=ctx, split=True, config=name)
                        r["pct_of_copy_bw"] = 100 * r["gbps"] * 1e9 / bw
                        rows.append(r)
                        print(
                            f"tiles B={batch:3} ctx={ctx:5} {name:42} {r['ms'] * 1e3:7.1f} us "
                            f"{r['pct_of_copy_bw']:5.1f}%",
                            flush=True,
                        )
    return rows


def sweep_merge(bw: float, repeats: int = 3) -> list[dict[str, Any]]:
    """Split-KV decode attention over the cap on the in-kernel merge's chunk (MERGE_TILE_ELEMENTS),
    `repeats` rounds over every setting so the spread between rounds shows: the tuning behind
    `launch_config`'s SEG_CHUNK rule. (Run 12's first sweep also moved the fewest tiles per
    segment, 1 or 2: one tile was as fast or faster in every case, `SPLIT_KV_MIN_TILES`.)"""
    from hallm.ops.triton import launch_config

    rows = []
    default = launch_config.MERGE_TILE_ELEMENTS
    cases = [("qwen2.5-0.5b", 64, 1024), ("qwen2.5-0.5b", 32, 1024), ("qwen2.5-0.5b", 64, 4096)]
    cases += [("llama-3.1-8b", 16, 4096), ("llama-3.1-8b", 32, 1024)]
    try:
        for rep in range(repeats):
            for model, batch, ctx in cases:
                for elements in (2048, 4096, 8192):
                    launch_config.MERGE_TILE_ELEMENTS = elements
                    r = attention_case(SHAPES[model], batch, ctx)
                    name = f"merge tile={elements}"
                    r.update(model=model, batch=batch, ctx=ctx, split=True, config=name, round=rep)
                    r["pct_of_copy_bw"] = 100 * r["gbps"] * 1e9 / bw
                    rows.append(r)
                    print(
                        f"merge round {rep} {model:13} B={batch:3} ctx={ctx:5} {name:18} "
                        f"{r['ms'] * 1e3:7.1f} us {r['pct_of_copy_bw']:5.1f}%",
                        flush=True,
                    )
    finally:
        launch_config.MERGE_TILE_ELEMENTS = default
    return rows


def step_worker(
    model: str, model_dir: str, batches: list[int], ctx: int, decode_tokens: int, eager: bool
) -> list[dict[str, Any]]:
    import random

    import torch

    from hallm.core.sampling_params import SamplingParams
    from hallm.entrypoints.llm import LLM

    llm = LLM(
        model=model_dir,
        device="cuda",
        load_format="dummy",
        dtype="bfloat16",
        max_model_len=ctx + decode_tokens + 64,
        max_num_seqs=max(batches),
        max_num_batched_tokens=8192,
        enforce_eager=eager,
    )
    runner = llm.engine.executor.worker.runner
    rng = random.Random(0)
    rows = []
    for batch in batches:
        prompts = [
            {"prompt_token_ids": [rng.randrange(1000, 30000) for _ in range(ctx)]} for _ in range(batch)
        ]

        def run(n: int, prompts: list[dict[str, Any]] = prompts) -> float:
            params = SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True, detokenize=False)
            torch.cuda.synchronize()
            start = time.perf_counter()
            llm.generate(prompts, params, use_tqdm=False)
            return time.perf_counter() - start

        run(1)  # prefill; the prompts stay in the prefix cache
        t1 = min(run(1) for _ in range(2))  # cached prefill of the last partial block + 1 token
        tk = min(run(1 + decode_tokens) for _ in range(2))
        step_ms = (tk - t1) / decode_tokens * 1e3
        replay_ms = None
        graphs = runner.graphs.decode if runner.graphs is not None else None
        if graphs is not None and batch <= graphs.max_size:
            g = graphs.graphs[int(graphs.bucket[batch])]
            start_ev, end_ev = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            g.replay()
            start_ev.record()
            for _ in range(20):
                g.replay()
            end_ev.record()
            torch.cuda.synchronize()
            replay_ms = start_ev.elapsed_time(end_ev) / 20
        rows.append(
            {
                "model": model,
                "batch": batch,
                "ctx": ctx,
                "step_ms": step_ms,
                "graph_replay_ms": replay_ms,
                "eager": eager,
            }
        )
        print(json.dumps(rows[-1]), flush=True)
        llm.reset_prefix_cache()
    return rows


def bench_steps(
    models: list[str], bw: float, tmp: Path, timeout: int, variants: list[str]
) -> list[dict[str, Any]]:
    rows = []
    # (model, variant): the shipped engine, then each A/B variant (benchmarks/variants.py)
    runs = [(m, label) for label in ["shipped", *variants] for m in models]
    for model, label in runs:
        model_dir = write_model_dir(model, tmp / model)
        result = tmp / f"steps-{model}-{len(rows)}.json"
        cmd = [
            sys.executable,
            __file__,
            "--step-worker",
            model,
            "--model-dir",
            str(model_dir),
            "--result",
            str(result),
            "--variant",
            label,
        ]
        proc = subprocess.run(cmd, timeout=timeout, capture_output=True, text=True, check=False)
        if proc.returncode != 0 or not result.exists():
            print(f"step worker {model} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}", flush=True)
            continue
        for r in json.loads(result.read_text()):
            r["variant"] = label
            floor_bytes = weight_bytes_read(model) + r["batch"] * (r["ctx"] + 16) * kv_bytes_per_token(model)
            r["floor_ms"] = floor_bytes / bw * 1e3
            r["step_over_floor"] = r["step_ms"] / r["floor_ms"]
            if r["graph_replay_ms"] is not None:
                r["replay_over_floor"] = r["graph_replay_ms"] / r["floor_ms"]
            rows.append(r)
            replay = f"{r['graph_replay_ms']:.3f}" if r["graph_replay_ms"] is not None else "-"
            print(
                f"step {model:13} {label} B={r['batch']:3} ctx~{r['ctx']}: engine {r['step_ms']:.3f} ms, graph replay "
                f"{replay} ms, floor {r['floor_ms']:.3f} ms -> {r['step_over_floor']:.2f}x floor",
                flush=True,
            )
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="benchmarks/results/raw")
    p.add_argument("--models", default="qwen2.5-0.5b")
    p.add_argument("--parts", default="copy,attention,step")
    p.add_argument("--sweep", action="store_true")
    p.add_argument("--sweep-tiles", action="store_true", help="Qwen2.5-0.5B attention tile/warp/stage sweep")
    p.add_argument("--sweep-merge", action="store_true", help="split-KV merge chunk / segment-length sweep")
    p.add_argument(
        "--ab",
        action="append",
        default=[],
        choices=[v for v in VARIANTS if v != "shipped"],
        help="also measure the decode steps of this engine variant (benchmarks/variants.py)",
    )
    p.add_argument("--variant", default="shipped", help=argparse.SUPPRESS)
    p.add_argument("--timeout", type=int, default=400)
    p.add_argument("--step-worker", help=argparse.SUPPRESS)
    p.add_argument("--model-dir", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.step_worker:
        apply_variant(args.variant)
        rows = step_worker(args.step_worker, args.model_dir, [1, 32, 128], 1024, 32, eager=False)
        Path(args.result).write_text(json.dumps(rows))
        return
    parts = args.parts.split(",")
    record: dict[str, Any] = {"benchmark": "G4", "env": environment()}
    bw = copy_bandwidth()
    record["copy_bw_gbps"] = bw / 1e9
    print(f"copy bandwidth: {bw / 1e9:.0f} GB/s (read + write)", flush=True)
    if "attention" in parts:
        record["attention"] = bench_attention(bw, args.sweep)
    if args.sweep_tiles:
        record["tile_sweep"] = sweep_tiles(bw)
    if args.sweep_merge:
        record["merge_sweep"] = sweep_merge(bw)
    if "step" in parts:
        tmp = Path(tempfile.mkdtemp(prefix="hallm-g4-"))
        record["steps"] = bench_steps(
            args.models.split(","),
            bw,
            tmp,
            args.timeout,
            args.ab,
        )
    append_jsonl(Path(args.out) / "g4.jsonl", record)


if __name__ == "__main__":
    main()
