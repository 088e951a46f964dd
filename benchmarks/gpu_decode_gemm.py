"""The decode-batch GEMM (hallm.ops.triton.decode_gemm, 17-256 rows) against cuBLAS.

    python3 benchmarks/gpu_decode_gemm.py [--rows 128,192,256] [--sweep-rows 192] [--out DIR]

On both models' qkv, o, gate/up and down (the shapes of benchmarks/gpu_linear.py), times
`F.linear` (cuBLAS) and `decode_linear`: its shipped configuration at every row count, and at
--sweep-rows a sweep of tiles (block_n 64/128/256, block_k 64/128, warps, stages, pointers or
TMA; each with its modelled work split), then every work split (split-K 1/2/4/8, stream-K) of
the three fastest; those three, refitted, also run at the other row counts. Timing as in
gpu_linear.py: CUDA-graph replays over weight copies (>= 256 MB), so every weight comes from
HBM. Every configuration is checked against cuBLAS; one that does not compile or launch (shared
memory) is skipped and printed. The kernels compile first, in parallel processes, into Triton's
cache. Prints per projection cuBLAS, shipped and best (with its configuration), and per layer
the sums.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import itertools
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.gpu_common import append_jsonl, copy_bandwidth, environment
from benchmarks.gpu_linear import L2_FLUSH_BYTES, SHAPES, time_op

DECODE_PROJS = ("qkv", "o", "gate_up", "down")
LAYERS = {"qwen2.5-0.5b": 24, "llama-3.1-8b": 32}
#: The fastest tile configurations at --sweep-rows: their work splits are swept, and they run
#: (refitted) at the other row counts.
DECODE_TOP = 3
#: CUDA-graph replay time of one measurement (ms; the median of 10 replays).
DECODE_REP_MS = 20
#: Most shared memory a sweep configuration's stages take (and at most the GPU's).
DECODE_SWEEP_SHARED = 220 * 1024

Job = tuple[int, int, bool, int, Any, Any]  # N, K, bias, rows, DecodeGemmConfig, TritonTarget


def device_target() -> Any:
    """This GPU as hallm-cuda describes it to its launches: SMs, opt-in shared memory, PDL."""
    from hallm_cuda.platform import CudaPlatform

    return CudaPlatform().triton_target()


def decode_label(cfg: Any) -> str:
    split = "stream-k" if cfg.stream_k else f"split{cfg.split_k}"
    operands = "tma" if cfg.tma else "ptr"
    return (
        f"n{cfg.block_n}/k{cfg.block_k}/m{cfg.block_m} {split} w{cfg.num_warps} st{cfg.num_stages} {operands}"
    )


def _stage_limit(cfg: Any, rows: int, target: Any) -> int:
    """The most pipeline stages of `cfg` at `rows` rows within the sweep's shared memory."""
    from hallm.ops.triton.decode_gemm import SHARED_RESERVE

    return min(DECODE_SWEEP_SHARED, target.shared_memory_bytes - SHARED_RESERVE) // cfg.stage_bytes(rows)


def refit(cfg: Any, rows: int, target: Any) -> Any:
    """`cfg` at another row count: its stages cut to what fits; None where two stages do not fit
    or the accumulators take more than 128 registers a thread."""
    stages = min(cfg.num_stages, _stage_limit(cfg, rows, target))
    padded = -(-rows // cfg.block_m) * cfg.block_m
    if stages < 2 or padded * cfg.block_n > 128 * 32 * cfg.num_warps:
        return None
    return dataclasses.replace(cfg, num_stages=stages)


def decode_tiles(rows: int, target: Any) -> list[Any]:
    """The sweep's tile configurations at `rows` rows (work split not chosen): block_n
    64/128/256 x block_k 64/128 over 64-row chunks; 4 and 8 warps where they hold the
    accumulators in at most 128 registers a thread, else 16; the two deepest of 2-5 stages
    whose shared memory (stages x (padded rows + block_n) x block_k x 2 bytes) fits; by
    pointers and by TMA. 26 at 192 rows on an H100."""
    from hallm.ops.triton.decode_gemm import DecodeGemmConfig

    out = []
    padded = -(-rows // 64) * 64
    for bn, bk in itertools.product((64, 128, 256), (64, 128)):
        warps = [w for w in (4, 8) if padded * bn <= 128 * 32 * w] or [16]
        deepest = _stage_limit(DecodeGemmConfig(bn, bk), rows, target)
        stages = [st for st in (2, 3, 4, 5) if st <= deepest][-2:]
        for w, st, tma in itertools.product(warps, stages, (False, True)):
            out.append(DecodeGemmConfig(bn, bk, num_warps=w, num_stages=st, tma=tma))
    return out


def decode_splits(cfg: Any, n: int, k: int, target: Any) -> list[Any]:
    """The work splits swept for one tile configuration: split_k 1, 2, 4, 8 (at most two waves
    of programs, two K tiles each at least), and stream-K where the units outnumber the SMs."""
    cols, tiles = -(-n // cfg.block_n), -(-k // cfg.block_k)
    out = [
        dataclasses.replace(cfg, split_k=s, stream_k=False)
        for s in (1, 2, 4, 8)
        if s == 1 or (cols * s <= 2 * target.num_sms and tiles >= 2 * s)
    ]
    if cols * tiles > target.num_sms:
        out.append(dataclasses.replace(cfg, split_k=1, stream_k=True))
    return out


def _compile_key(job: Job) -> tuple[Any, ...]:
    """What decides a launch's compiled kernel: the tile configuration (not its work split,
    whose ints the kernel does not specialize on), the row chunks, the bias, whether K tiles
    evenly, and whether N and K are multiples of 16."""
    n, k, bias, rows, cfg, _ = job
    tile = dataclasses.replace(cfg, split_k=1, stream_k=False)
    return (tile, -(-rows // cfg.block_m), bias, k % cfg.block_k == 0, n % 16 == 0, k % 16 == 0)


_WORKER_OPERANDS: dict[tuple[int, int, int, bool], Any] = {}


def _compile_decode(job: Job, dev: str = "cuda") -> str | None:
    """In a worker process: one decode_linear launch, which compiles its kernel into Triton's
    disk cache, where the parent's first launch finds it. Returns the error, or None."""
    import torch

    from hallm.ops.triton.decode_gemm import decode_linear

    n, k, bias, rows, cfg, target = job
    try:
        if (n, k, rows, bias) not in _WORKER_OPERANDS:
            zeros = functools.partial(torch.zeros, device=dev, dtype=torch.bfloat16)
            _WORKER_OPERANDS[n, k, rows, bias] = (zeros(rows, k), zeros(n, k), zeros(n) if bias else None)
        x, w, b = _WORKER_OPERANDS[n, k, rows, bias]
        decode_linear(x, w, b, config=cfg, target=target)
        if dev == "cuda":
            torch.cuda.synchronize()
        return None
    except Exception as e:  # the parent reports it and skips the configuration
        return f"{type(e).__name__}: {str(e)[:300]}"


def precompile(pool: Any, jobs: list[Job], dev: str) -> dict[tuple[Any, ...], str]:
    """Compile the distinct kernels of `jobs` in `pool`'s worker processes; returns the errors
    by compile key. A broken pool is reported, and the timing loop compiles what it needs."""
    unique: dict[tuple[Any, ...], Job] = {}
    for job in jobs:
        unique.setdefault(_compile_key(job), job)
    start = time.perf_counter()
    errors = {}
    try:
        compiled = pool.map(functools.partial(_compile_decode, dev=dev), unique.values())
        for key, err in zip(unique, compiled, strict=True):
            if err is not None:
                errors[key] = err
    except Exception as e:
        print(f"  parallel compile failed ({type(e).__name__}: {e}); the timing loop compiles", flush=True)
    print(f"  {len(unique)} kernels compiled in {time.perf_counter() - start:.0f} s", flush=True)
    return errors


class DecodeOperands:
    """One projection's operands: weight (and bias) copies of >= L2_FLUSH_BYTES, so that every
    weight comes from HBM, split-K counters per copy, and activation rows per row count."""

    def __init__(self, n: int, k: int, bias: bool, dev: str) -> None:
        import torch

        from hallm.ops.triton.decode_gemm import counters_for

        self.n, self.k, self.bias, self.dev = n, k, bias, dev
        self.copies = max(1, -(-L2_FLUSH_BYTES // (n * k * 2)))
        self.gen = torch.Generator(device=dev).manual_seed(n + k)
        randn = functools.partial(torch.randn, device=dev, dtype=torch.bfloat16, generator=self.gen)
        self.ws = [randn(n, k) * k**-0.5 for _ in range(self.copies)]
        self.bs = [randn(n) if bias else None for _ in range(self.copies)]
        self.counters = [counters_for(n, dev) for _ in range(self.copies)]
        self.xs: dict[int, Any] = {}

    def x(self, rows: int) -> Any:
        import torch

        if rows not in self.xs:
            self.xs[rows] = torch.randn(
                rows, self.k, device=self.dev, dtype=torch.bfloat16, generator=self.gen
            )
        return self.xs[rows]


def bench_decode(
    ops: DecodeOperands,
    rows: int,
    configs: list[Any],
    target: Any,
    errors: dict[tuple[Any, ...], str],
    timer: Any,
) -> tuple[float, list[dict[str, Any]]]:
    """cuBLAS's microseconds per call, and an entry per configuration: its microseconds (its
    output checked against cuBLAS's), or why it was skipped (a compile or launch error: out
    of shared memory) or is wrong."""
    import torch.nn.functional as F

    from hallm.ops.triton.decode_gemm import decode_linear

    x = ops.x(rows)
    want = F.linear(x, ops.ws[0], ops.bs[0]).float()
    t_cublas = timer(lambda i: lambda: F.linear(x, ops.ws[i], ops.bs[i]), ops.copies, rep=DECODE_REP_MS)
    out = []
    for cfg in configs:
        entry: dict[str, Any] = {"config": decode_label(cfg), **dataclasses.asdict(cfg)}
        out.append(entry)

        def call(i: int, cfg: Any = cfg) -> Any:
            return lambda: decode_linear(
                x, ops.ws[i], ops.bs[i], config=cfg, counters=ops.counters[i], target=target
            )

        error = errors.get(_compile_key((ops.n, ops.k, ops.bias, rows, cfg, target)))
        if error is None:
            try:
                err = (call(0)().float() - want).abs().max().item()
                if err > 0.05 * max(1.0, want.abs().max().item()):
                    entry["wrong"] = err
                    print(f"    WRONG    {decode_label(cfg)}: differs from cuBLAS by {err}", flush=True)
                    continue
                entry["us"] = timer(call, ops.copies, rep=DECODE_REP_MS)
                print(f"    {entry['us']:8.2f} us  {decode_label(cfg)}", flush=True)
                continue
            except Exception as e:  # out of shared memory or registers, a compile error
                error = f"{type(e).__name__}: {str(e)[:300]}"
        entry["skipped"] = error
        print(f"    skipped  {decode_label(cfg)}: {error}", flush=True)
    return t_cublas, out


def _fastest(entries: list[dict[str, Any]], count: int, distinct_tiles: bool = True) -> list[dict[str, Any]]:
    """The `count` fastest timed entries; with distinct_tiles, one per tile configuration."""
    out: list[dict[str, Any]] = []
    seen = set()
    for e in sorted((e for e in entries if "us" in e), key=lambda e: e["us"]):
        tile = tuple(e[f] for f in ("block_n", "block_k", "block_m", "num_warps", "num_stages", "tma"))
        if not (distinct_tiles and tile in seen):
            seen.add(tile)
            out.append(e)
    return out[:count]


def _config_of(entry: dict[str, Any]) -> Any:
    from hallm.ops.triton.decode_gemm import DecodeGemmConfig

    fields = {f.name for f in dataclasses.fields(DecodeGemmConfig)}
    return DecodeGemmConfig(**{k: v for k, v in entry.items() if k in fields})


def _decode_row(
    ops: DecodeOperands, rows: int, t_cublas: float, entries: list[dict[str, Any]]
) -> dict[str, Any]:
    """One projection at one row count: cuBLAS, the shipped configuration (the first entry),
    the best, the weight stream's GB/s, and every entry."""
    w_bytes = ops.n * ops.k * 2
    best = _fastest(entries, 1, distinct_tiles=False)
    t_shipped, t_best = entries[0].get("us"), best[0]["us"] if best else None
    return {
        "n": ops.n,
        "k": ops.k,
        "bias": ops.bias,
        "m": rows,
        "weight_mb": w_bytes / 1e6,
        "cublas_us": t_cublas,
        "cublas_gbps": w_bytes / t_cublas / 1e3,
        "shipped": entries[0]["config"],
        "shipped_us": t_shipped,
        "best": best[0]["config"] if best else None,
        "best_us": t_best,
        "best_gbps": w_bytes / t_best / 1e3 if t_best else None,
        "cublas_over_best": t_cublas / t_best if t_best else None,
        "cublas_over_shipped": t_cublas / t_shipped if t_shipped else None,
        "configs": entries,
    }


def run_decode_gemm(
    models: list[str],
    rows_list: list[int],
    sweep_rows: int,
    target: Any,
    dev: str = "cuda",
    timer: Any = time_op,
) -> dict[str, Any]:
    """The benchmark: its record, with `wrong` listing configurations whose output
    differs from cuBLAS's."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    from hallm.ops.triton.decode_gemm import decode_gemm_config, with_work_split

    start = time.perf_counter()
    print(f"{target}; the sweep at {sweep_rows} rows; rows {rows_list}", flush=True)
    shapes = [(model, proj, *SHAPES[model][proj]) for model in models for proj in DECODE_PROJS]
    results: dict[tuple[str, str, int], dict[str, Any]] = {}
    plans: dict[tuple[str, str, int], list[Any]] = {}
    others = [r for r in rows_list if r != sweep_rows]
    tiles = decode_tiles(sweep_rows, target)
    workers = max(1, min(12, (os.cpu_count() or 2) - 1))
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        # 1. at sweep_rows: the shipped configuration, every tile with its modelled work split,
        # then every work split of the fastest tiles (the same kernels: no compile)
        sweep = {
            (m, p): [
                with_work_split(c, sweep_rows, n, k, target)
                for c in [decode_gemm_config(sweep_rows, n, k, target), *tiles]
            ]
            for m, p, n, k, _ in shapes
        }
        print(f"compiling at {sweep_rows} rows in {workers} processes", flush=True)
        jobs = [(n, k, bias, sweep_rows, c, target) for m, p, n, k, bias in shapes for c in sweep[m, p]]
        errors = precompile(pool, jobs, dev)
        for model, proj, n, k, bias in shapes:
            print(f"{model} {proj} (N={n}, K={k}) M={sweep_rows}", flush=True)
            ops = DecodeOperands(n, k, bias, dev)
            stage_a = list(dict.fromkeys(sweep[model, proj]))  # the shipped one first, no repeats
            t_cublas, entries = bench_decode(ops, sweep_rows, stage_a, target, errors, timer)
            timed = {e["config"] for e in entries}
            fastest = [_config_of(e) for e in _fastest(entries, DECODE_TOP)]
            stage_b = [
                c for f in fastest for c in decode_splits(f, n, k, target) if decode_label(c) not in timed
            ]
            if stage_b:
                print("  the work splits of the fastest tiles:", flush=True)
                entries += bench_decode(ops, sweep_rows, stage_b, target, errors, timer)[1]
            results[model, proj, sweep_rows] = {
                "model": model,
                "proj": proj,
                **_decode_row(ops, sweep_rows, t_cublas, entries),
            }
            best = [_config_of(e) for e in _fastest(entries, DECODE_TOP)]
            for rows in others:  # 2. the shipped configuration and the sweep's fastest, refitted
                fits = [c for c in (refit(b, rows, target) for b in best) if c is not None]
                plans[model, proj, rows] = list(
                    dict.fromkeys([decode_gemm_config(rows, n, k, target), *fits])
                )
            del ops
        if others:
            print(f"compiling for rows {others}", flush=True)
            jobs = [
                (n, k, bias, r, c, target)
                for m, p, n, k, bias in shapes
                for r in others
                for c in plans[m, p, r]
            ]
            errors.update(precompile(pool, jobs, dev))
    for model, proj, n, k, bias in shapes:
        if not others:
            break
        ops = DecodeOperands(n, k, bias, dev)
        for rows in others:
            print(f"{model} {proj} (N={n}, K={k}) M={rows}", flush=True)
            t_cublas, entries = bench_decode(ops, rows, plans[model, proj, rows], target, errors, timer)
            results[model, proj, rows] = {
                "model": model,
                "proj": proj,
                **_decode_row(ops, rows, t_cublas, entries),
            }
        del ops

    record: dict[str, Any] = {
        "benchmark": "decode-gemm",
        "target": dataclasses.asdict(target),
        "sweep_rows": sweep_rows,
        "rows": [results[m, p, r] for m in models for p in DECODE_PROJS for r in rows_list],
        "layers": [],
    }
    print(f"\n=== decode GEMM vs cuBLAS, {time.perf_counter() - start:.0f} s ===", flush=True)
    for r in record["rows"]:
        ratio = f"{r['cublas_over_best']:.3f}x" if r["cublas_over_best"] else "n/a"
        print(
            f"{r['model']:13} {r['proj']:8} M={r['m']:3}: cuBLAS {r['cublas_us']:7.2f} us ({r['cublas_gbps']:5.0f} GB/s), "
            f"shipped {_us(r['shipped_us'])}, best {_us(r['best_us'])} ({r['best_gbps'] or 0:5.0f} GB/s), "
            f"cuBLAS/best {ratio}  [{r['best']}]",
            flush=True,
        )
    for model in models:
        for rows in rows_list:
            rs = [results[model, p, rows] for p in DECODE_PROJS]
            sums = {
                key: sum(r[key] or float("nan") for r in rs) for key in ("cublas_us", "best_us", "shipped_us")
            }
            layers = LAYERS[model]
            record["layers"].append({"model": model, "m": rows, "layers": layers, **sums})
            print(
                f"{model:13} layer M={rows:3} (qkv+o+gate_up+down): cuBLAS {sums['cublas_us']:7.1f} us, "
                f"best per shape {sums['best_us']:7.1f} us, shipped {sums['shipped_us']:7.1f} us; "
                f"x{layers} layers: {sums['cublas_us'] * layers / 1e3:.2f} / {sums['best_us'] * layers / 1e3:.2f} / "
                f"{sums['shipped_us'] * layers / 1e3:.2f} ms",
                flush=True,
            )
    record["wrong"] = [
        [r["model"], r["proj"], r["m"], e["config"]]
        for r in record["rows"]
        for e in r["configs"]
        if "wrong" in e
    ]
    return record


def _us(t: float | None) -> str:
    return f"{t:7.2f} us" if t is not None else "    n/a   "


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", default="128,192,256")
    p.add_argument("--models", default="qwen2.5-0.5b,llama-3.1-8b")
    p.add_argument("--sweep-rows", type=int, default=192, help="the row count of the sweep")
    p.add_argument("--out", default="benchmarks/results/raw")
    args = p.parse_args()
    bw = copy_bandwidth()
    print(f"copy bandwidth: {bw / 1e9:.0f} GB/s (read + write)", flush=True)
    rows_list = [int(r) for r in args.rows.split(",")]
    sweep_rows = args.sweep_rows if args.sweep_rows in rows_list else rows_list[len(rows_list) // 2]
    record = run_decode_gemm(args.models.split(","), rows_list, sweep_rows, device_target())
    record.update(env=environment(), copy_bw_gbps=bw / 1e9)
    append_jsonl(Path(args.out) / "decode-gemm.jsonl", record)
    if record["wrong"]:
        raise SystemExit(f"configurations whose output differs from cuBLAS's: {record['wrong']}")
    print(json.dumps({"done": len(record["rows"])}))


if __name__ == "__main__":
    main()
