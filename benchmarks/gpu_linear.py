"""Decode-sized projections: the skinny GEMM (hallm.ops.triton.skinny_gemm) against cuBLAS.

    python3 benchmarks/gpu_linear.py [--rows 1,16,32,64] [--sweep] [--out DIR]

For each projection of Qwen2.5-0.5B and Llama-3.1-8B (qkv with its bias, o, gate/up, down,
lm_head) and each row count, times `F.linear` (what the model runs without the skinny kernel)
and `skinny_linear` with its shipped configuration, in CUDA-graph replays over enough weight
copies (>= 256 MB) that every weight comes from HBM, as inside a model. Prints microseconds, the
weight stream's GB/s, and cuBLAS / skinny. --sweep also tries other tiles at one row and prints
the best per projection. --fused times what the fused decoder stack launches for Qwen2.5-0.5B's
qkv (RMSNorm with the residual, projection, rotary) against the kernels of the per-module path,
with a few tile/split/stage choices for the fused launch.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.gpu_common import append_jsonl, copy_bandwidth, environment

# name: (N, K, bias); gate/up is the stacked [gate; up] weight (N = 2 x the intermediate size)
SHAPES = {
    "qwen2.5-0.5b": {
        "qkv": (1152, 896, True),
        "o": (896, 896, False),
        "gate_up": (9728, 896, False),
        "down": (896, 4864, False),
        "lm_head": (151936, 896, False),
    },
    "llama-3.1-8b": {
        "qkv": (6144, 4096, False),
        "o": (4096, 4096, False),
        "gate_up": (28672, 4096, False),
        "down": (4096, 14336, False),
        "lm_head": (128256, 4096, False),
    },
}
L2_FLUSH_BYTES = 256 << 20


def time_op(make_fn: Any, copies: int, rep: int = 60) -> float:
    """Microseconds per call of make_fn(i)() averaged over `copies` distinct operands, from CUDA
    graph replays of about `rep` ms (the median of 10)."""
    import triton.testing

    fns = [make_fn(i) for i in range(copies)]

    def run() -> None:
        for f in fns:
            f()

    run()
    return triton.testing.do_bench_cudagraph(run, rep=rep, return_mode="median") * 1e3 / copies


def bench_shape(n: int, k: int, bias: bool, rows: int, configs: list[Any]) -> dict[str, Any]:
    import torch
    import torch.nn.functional as F

    from hallm.ops.triton.skinny_gemm import counters_for, skinny_config, skinny_linear

    dev = "cuda"
    w_bytes = n * k * 2
    copies = max(1, -(-L2_FLUSH_BYTES // w_bytes))
    gen = torch.Generator(device=dev).manual_seed(0)
    ws = [torch.randn(n, k, device=dev, dtype=torch.bfloat16, generator=gen) * k**-0.5 for _ in range(copies)]
    bs = [
        torch.randn(n, device=dev, dtype=torch.bfloat16, generator=gen) if bias else None
        for _ in range(copies)
    ]
    x = torch.randn(rows, k, device=dev, dtype=torch.bfloat16, generator=gen)
    counters = [counters_for(n, dev) for _ in range(copies)]

    def cublas(i: int) -> Any:
        return lambda: F.linear(x, ws[i], bs[i])

    want = cublas(0)()
    t_cublas = time_op(cublas, copies)
    row: dict[str, Any] = {"n": n, "k": k, "rows": rows, "weight_mb": w_bytes / 1e6, "cublas_us": t_cublas}
    shipped = skinny_config(rows, n, k)
    results = []
    for cfg in [shipped, *[c for c in configs if c != shipped]]:

        def skinny(i: int, cfg: Any = cfg) -> Any:
            return lambda: skinny_linear(x, ws[i], bs[i], counters=counters[i], config=cfg)

        got = skinny(0)()
        err = (got.float() - want.float()).abs().max().item()
        if err > 0.05 * max(1.0, want.float().abs().max().item()):
            raise AssertionError(f"skinny {cfg} differs from cuBLAS by {err}")
        results.append((time_op(skinny, copies), cfg))
        if configs:
            print(f"    {results[-1][0]:8.2f} us  {cfg}", flush=True)
    t_shipped = results[0][0]
    best_t, best_cfg = min(results, key=lambda r: r[0])
    row.update(
        skinny_us=t_shipped,
        shipped=str(shipped),
        cublas_over_skinny=t_cublas / t_shipped,
        skinny_gbps=w_bytes / (t_shipped * 1e-6) / 1e9,
        cublas_gbps=w_bytes / (t_cublas * 1e-6) / 1e9,
    )
    if len(results) > 1:
        row.update(best_us=best_t, best=str(best_cfg))
    return row


def sweep_configs(n: int, k: int) -> list[Any]:
    from hallm.ops.triton.skinny_gemm import SkinnyConfig

    out = []
    for bn, bk in itertools.product((16, 32, 64), (256, 512, 1024)):
        for split in (1, 2, 4, 8):
            if split > 1 and k // (split * bk) < 1:
                continue
            out.append(SkinnyConfig(16, bn, bk, split, num_warps=4, num_stages=3))
    return out


def bench_fused(rows: int) -> list[dict[str, Any]]:
    """Qwen2.5-0.5B's qkv as the fused decoder stack launches it (RMSNorm with the residual,
    projection, rotary) vs the module chain."""
    import torch

    from hallm.ops.triton.fused import rms_norm, rotary
    from hallm.ops.triton.skinny_gemm import (
        RMSNormPrologue,
        RotaryEpilogue,
        SkinnyConfig,
        counters_for,
        skinny_config,
        skinny_linear,
    )

    dev, dt = "cuda", torch.bfloat16
    hidden, d = 896, 64
    n_rows = 18 * d
    gen = torch.Generator(device=dev).manual_seed(0)
    x = torch.randn(rows, hidden, device=dev, dtype=dt, generator=gen)
    res = torch.randn(rows, hidden, device=dev, dtype=dt, generator=gen)
    nw = torch.randn(hidden, device=dev, dtype=dt, generator=gen) * 0.1 + 1
    pos = torch.arange(1000, 1000 + rows, device=dev)
    inv = 1.0 / (1e6 ** (torch.arange(0, d, 2, device=dev).float() / d))
    copies = max(1, -(-L2_FLUSH_BYTES // (n_rows * hidden * 2)))
    ws = [
        torch.randn(n_rows, hidden, device=dev, dtype=dt, generator=gen) * hidden**-0.5 for _ in range(copies)
    ]
    bs = [torch.randn(n_rows, device=dev, dtype=dt, generator=gen) for _ in range(copies)]
    counters = [counters_for(n_rows, dev) for _ in range(copies)]
    rope = RotaryEpilogue(pos, inv, 1.0, d, 16)

    def modules(i: int) -> Any:
        def run() -> None:
            h, _ = rms_norm(x, nw, 1e-6, res)
            y = skinny_linear(h, ws[i], bs[i], counters=counters[i])
            q, k, _ = y.split([14 * d, 2 * d, 2 * d], dim=-1)
            rotary(pos, q.view(rows, 14, d), k.view(rows, 2, d), inv, 1.0)

        return run

    def fused(i: int, cfg: Any) -> Any:
        norm = RMSNormPrologue(nw, 1e-6, res)
        return lambda: skinny_linear(
            x, ws[i], bs[i], norm=norm, rotary=rope, counters=counters[i], config=cfg
        )

    t_modules = time_op(modules, copies)
    shipped = skinny_config(rows, n_rows, hidden, paired=True)
    variants = ((256, 1, 4, 3), (128, 7, 4, 2), (256, 4, 8, 2), (256, 4, 4, 1), (512, 2, 8, 2))
    configs = [shipped] + [
        SkinnyConfig(shipped.block_m, 16, bk, sp, num_warps=w, num_stages=st) for bk, sp, w, st in variants
    ]
    out = []
    for cfg in configs:
        t = time_op(lambda i, cfg=cfg: fused(i, cfg), copies)
        label = "shipped" if cfg is shipped else "variant"
        print(
            f"fused qkv M={rows:3}: modules {t_modules:6.2f} us, fused {t:6.2f} us ({label} {cfg})",
            flush=True,
        )
        out.append(
            {
                "fused": "qkv",
                "rows": rows,
                "modules_us": t_modules,
                "fused_us": t,
                "config": str(cfg),
                "shipped": cfg is shipped,
            }
        )
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", default="1,16,32,64")
    p.add_argument("--models", default="qwen2.5-0.5b,llama-3.1-8b")
    p.add_argument("--sweep", action="store_true")
    p.add_argument("--fused", action="store_true", help="only the fused decoder stack's launch")
    p.add_argument("--out", default="benchmarks/results/raw")
    args = p.parse_args()
    bw = copy_bandwidth()
    print(f"copy bandwidth: {bw / 1e9:.0f} GB/s (read + write)", flush=True)
    record: dict[str, Any] = {
        "benchmark": "skinny-gemm",
        "env": environment(),
        "copy_bw_gbps": bw / 1e9,
        "rows": [],
    }
    if args.fused:
        record["fused"] = [r for rows in args.rows.split(",") for r in bench_fused(int(rows))]
        append_jsonl(Path(args.out) / "skinny-gemm.jsonl", record)
        return
    for model in args.models.split(","):
        for name, (n, k, bias) in SHAPES[model].items():
            for rows in [int(r) for r in args.rows.split(",")]:
                configs = sweep_configs(n, k) if args.sweep and rows == 1 else []
                r = {"model": model, "proj": name, **bench_shape(n, k, bias, rows, configs)}
                record["rows"].append(r)
                best = f", best {r['best_us']:.2f} us {r['best']}" if "best" in r else ""
                print(
                    f"{model:13} {name:8} M={rows:3}: cuBLAS {r['cublas_us']:7.2f} us ({r['cublas_gbps']:5.0f} GB/s), "
                    f"skinny {r['skinny_us']:7.2f} us ({r['skinny_gbps']:5.0f} GB/s) -> {r['cublas_over_skinny']:.2f}x{best}",
                    flush=True,
                )
    append_jsonl(Path(args.out) / "skinny-gemm.jsonl", record)
    print(json.dumps({"done": len(record["rows"])}))


if __name__ == "__main__":
    main()
