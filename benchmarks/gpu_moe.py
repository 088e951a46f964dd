"""Decode-step MoE layer time: the Triton fused MoE (hallm.ops.triton.fused_moe) against the
floor of the bytes it must read and against the pure-torch reference, in the same run.

NOT RUN YET: written without a GPU; no numbers from it exist. Checked on a CPU only: its
argument parsing and imports, and its measuring code once at toy shapes in Triton's interpreter
with the timer stubbed out.

    python3 benchmarks/gpu_moe.py [--batches 1,32,128] [--copies 4] [--out DIR]

Shapes default to Qwen3-30B-A3B's MoE layer (hidden 2048, 128 experts, top-8, moe_intermediate
768, bf16, 48 layers), with dummy weights. For each decode batch size it routes random hidden
states with the softmax top-k router and times one MoE layer:
- `triton_graph_us`: `fused_moe` (align step + both GEMMs + the top-k sum) replayed from a CUDA
  graph, what a captured decode step runs;
- `triton_us` and `reference_us`: the Triton entry and `hallm.ops.reference_ops.fused_moe`
  (one F.linear chain per chosen expert; it syncs with the host, so it cannot be captured),
  both launched eagerly;
- `floor_us`: the weight bytes of the experts the batch actually chose (each read once) divided
  by the measured copy bandwidth (read + write bytes of a device-to-device copy);
and prints triton/floor and reference/triton. `--sweep` also times other tile shapes
(BLOCK_N, BLOCK_K, stages; the shipped BLOCK_M) at each batch and prints the fastest, for tuning
`hallm.ops.triton.moe_align.moe_config`. Each timed call cycles over `--copies` layers of
distinct weights so that the chosen experts come from HBM, as in a model, not from L2. The
result is also checked against the reference. Appends a record to DIR/moe.jsonl.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

#: Qwen3-30B-A3B (its published config.json): hidden_size, num_experts, num_experts_per_tok,
#: moe_intermediate_size, num_hidden_layers.
QWEN3_30B_A3B = {"hidden": 2048, "experts": 128, "top_k": 8, "inter": 768, "layers": 48}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batches", default="1,32,128", help="decode batch sizes (tokens per step)")
    p.add_argument("--hidden", type=int, default=QWEN3_30B_A3B["hidden"])
    p.add_argument("--experts", type=int, default=QWEN3_30B_A3B["experts"])
    p.add_argument("--top-k", type=int, default=QWEN3_30B_A3B["top_k"])
    p.add_argument("--inter", type=int, default=QWEN3_30B_A3B["inter"], help="moe_intermediate_size")
    p.add_argument("--layers", type=int, default=QWEN3_30B_A3B["layers"], help="for the per-step estimate")
    p.add_argument("--copies", type=int, default=4, help="layers of distinct weights cycled per timing")
    p.add_argument("--sweep", action="store_true", help="also time other tile shapes")
    p.add_argument("--out", default="benchmarks/results/raw")
    args = p.parse_args(argv)
    args.batch_list = [int(b) for b in args.batches.split(",")]
    if args.copies < 1 or any(b < 1 for b in args.batch_list):
        p.error("--copies and every batch size must be >= 1")
    return args


def _time_us(fns: list[Any], graph: bool) -> float:
    """Median microseconds per call, cycling over `fns` (one per weight copy)."""
    import triton.testing

    def run() -> None:
        for f in fns:
            f()

    run()
    bench = triton.testing.do_bench_cudagraph if graph else triton.testing.do_bench
    return float(bench(run, rep=100, return_mode="median")) * 1e3 / len(fns)


def bench_batch(args: argparse.Namespace, batch: int, layers: list[Any], bandwidth: float) -> dict[str, Any]:
    import torch

    from hallm.ops import reference_ops as ref
    from hallm.ops.triton.fused_moe import fused_moe
    from hallm.ops.triton.target import TritonTarget

    props = torch.cuda.get_device_properties(0)
    major = props.major
    target = TritonTarget(num_sms=props.multi_processor_count, pdl=major >= 9)
    dev, dt = "cuda", torch.bfloat16
    gen = torch.Generator(device=dev).manual_seed(batch)
    hidden = torch.randn(batch, args.hidden, device=dev, dtype=dt, generator=gen)
    logits = torch.randn(batch, args.experts, device=dev, generator=gen)
    weights, ids = ref.softmax_topk(logits, args.top_k, renormalize=True)

    got = fused_moe(hidden, weights, ids, *layers[0], target=target)
    want = ref.fused_moe(hidden, weights, ids, *layers[0])
    err = (got.float() - want.float()).abs().max().item()
    scale = want.float().abs().max().item()
    if err > 0.05 * max(1.0, scale):
        raise AssertionError(f"batch {batch}: fused_moe differs from the reference by {err} (max {scale})")

    def triton_fns() -> list[Any]:
        return [lambda w=w: fused_moe(hidden, weights, ids, *w, target=target) for w in layers]

    ref_fns = [lambda w=w: ref.fused_moe(hidden, weights, ids, *w) for w in layers]
    t_graph = _time_us(triton_fns(), graph=True)
    t_eager = _time_us(triton_fns(), graph=False)
    t_ref = _time_us(ref_fns, graph=False)
    row: dict[str, Any] = {}
    if args.sweep:
        row["sweep"] = sweep(hidden, weights, ids, layers, target, err_limit=0.05 * max(1.0, scale))
    active = int(torch.unique(ids).numel())
    per_expert = (2 * args.inter * args.hidden + args.hidden * args.inter) * 2
    active_bytes = active * per_expert
    floor = active_bytes / bandwidth * 1e6
    return {
        **row,
        "batch": batch,
        "active_experts": active,
        "active_mb": active_bytes / 1e6,
        "floor_us": floor,
        "triton_graph_us": t_graph,
        "triton_us": t_eager,
        "reference_us": t_ref,
        "triton_over_floor": t_graph / floor,
        "reference_over_triton": t_ref / t_eager,
        "step_moe_ms": t_graph * args.layers / 1e3,
        "max_abs_err": err,
    }


def sweep(
    hidden: Any, weights: Any, ids: Any, layers: list[Any], target: Any, err_limit: float
) -> list[dict[str, Any]]:
    """Graph-replay microseconds of `fused_moe` with other tiles (BLOCK_M as shipped), fastest first."""
    import dataclasses
    import itertools

    from hallm.ops.reference_ops import fused_moe as reference
    from hallm.ops.triton.fused_moe import fused_moe
    from hallm.ops.triton.moe_align import moe_config

    shipped = moe_config(ids.numel(), layers[0][0].shape[0], hidden.dtype, target)
    want = reference(hidden, weights, ids, *layers[0]).float()
    results = []
    for bn, bk, stages in itertools.product((32, 64, 128), (32, 64, 128), (2, 3, 4)):
        cfg = dataclasses.replace(shipped, block_n=bn, block_k=bk, num_stages=stages)
        try:
            got = fused_moe(hidden, weights, ids, *layers[0], target=target, config=cfg)
        except Exception as exc:  # a tile that does not fit (shared memory): report it, go on
            print(f"    {cfg}: {type(exc).__name__}", flush=True)
            continue
        if (got.float() - want).abs().max().item() > err_limit:
            raise AssertionError(f"{cfg} differs from the reference")
        fns = [
            lambda w=w, cfg=cfg: fused_moe(hidden, weights, ids, *w, target=target, config=cfg)
            for w in layers
        ]
        results.append({"config": str(cfg), "us": _time_us(fns, graph=True), "shipped": cfg == shipped})
    results.sort(key=lambda r: r["us"])
    for r in results[:5]:
        print(f"    {r['us']:7.1f} us  {r['config']}{'  (shipped)' if r['shipped'] else ''}", flush=True)
    return results


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    import torch

    from benchmarks.gpu_common import append_jsonl, copy_bandwidth, environment

    if not torch.cuda.is_available():
        raise SystemExit("gpu_moe.py needs a CUDA GPU (torch.cuda.is_available() is False)")
    bw = copy_bandwidth()
    print(f"copy bandwidth: {bw / 1e9:.0f} GB/s (read + write)", flush=True)
    dev, dt = "cuda", torch.bfloat16
    gen = torch.Generator(device=dev).manual_seed(0)
    e, h, i = args.experts, args.hidden, args.inter
    layers = [
        (
            torch.randn(e, 2 * i, h, device=dev, dtype=dt, generator=gen) * h**-0.5,
            torch.randn(e, h, i, device=dev, dtype=dt, generator=gen) * i**-0.5,
        )
        for _ in range(args.copies)
    ]
    record: dict[str, Any] = {
        "benchmark": "fused-moe",
        "env": environment(),
        "copy_bw_gbps": bw / 1e9,
        "shape": {k: getattr(args, k) for k in ("hidden", "experts", "top_k", "inter", "layers")},
        "rows": [],
    }
    for batch in args.batch_list:
        r = bench_batch(args, batch, layers, bw)
        record["rows"].append(r)
        print(
            f"batch {batch:4}: {r['active_experts']:3} experts ({r['active_mb']:6.1f} MB), floor {r['floor_us']:7.1f} us | "
            f"triton graph {r['triton_graph_us']:7.1f} us ({r['triton_over_floor']:.2f}x floor), "
            f"eager {r['triton_us']:7.1f} us | reference {r['reference_us']:8.1f} us "
            f"({r['reference_over_triton']:.1f}x triton) | {args.layers} layers: {r['step_moe_ms']:.2f} ms/step",
            flush=True,
        )
    append_jsonl(Path(args.out) / "moe.jsonl", record)
    print(json.dumps({"done": len(record["rows"])}))


if __name__ == "__main__":
    main()
