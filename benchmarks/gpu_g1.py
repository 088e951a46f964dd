"""G1: offline throughput on nano-vllm's workload (256 requests, prompt and output lengths
U[100, 1024], seed 0, temperature 0.6, ignore_eos), bf16 dummy weights with real shapes.

Three systems, each in its own subprocess, on the same prompt file:
  hallm        LLM.generate over all requests (CUDA platform, Triton attention, decode graphs)
  hf_cb        HF transformers continuous batching (`init_continuous_batching`, per-request
               max_new_tokens), the default `paged|sdpa` path
  hf_padded    HF `generate` on left-padded batches (vLLM's `--backend hf` baseline)
HF baselines are slow, so they run on the first N requests (`--hf-cb-requests`,
`--hf-padded-requests`); each system reports output tokens / wall time of its own run.
Nothing is detokenized (token ids in, token ids out) in any system; with `--text` hallm also
runs text out (detokenized; the model directory's small tokenizer does not cover the model's
vocabulary, so ids past it decode to nothing, which still costs the detokenizer's calls).
hallm's row: the first run of the fresh process (after the engine's start-up warm-up) apart,
then `--num-iters` timed runs (ids and text interleaved), median and min-max.

    python benchmarks/gpu_g1.py --model qwen2.5-0.5b --text --out benchmarks/results/raw
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.gpu_common import append_jsonl, environment, g1_workload, model_config, write_model_dir


def run_hallm(
    model_dir: str, prompts: list[list[int]], outs: list[int], args: argparse.Namespace
) -> dict[str, Any]:
    from hallm.core.sampling_params import SamplingParams
    from hallm.entrypoints.llm import LLM

    t_load = time.perf_counter()
    llm = LLM(
        model=model_dir,
        device=args.device,
        load_format="dummy",
        dtype="bfloat16" if args.device == "cuda" else "float32",
        max_model_len=max(2048, max(map(len, prompts)) + max(outs)),
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        enforce_eager=args.enforce_eager,
        tensor_parallel_size=args.tensor_parallel_size,
        distributed_executor_backend=args.distributed_executor_backend,
        seed=0,
    )
    load_s = time.perf_counter() - t_load
    inputs = [{"prompt_token_ids": p} for p in prompts]

    def one_run(detokenize: bool) -> tuple[float, int]:
        params = [
            SamplingParams(temperature=0.6, max_tokens=n, ignore_eos=True, detokenize=detokenize)
            for n in outs
        ]
        llm.reset_prefix_cache()  # no run hands the next a cached prefix
        start = time.perf_counter()
        results = llm.generate(inputs, params, use_tqdm=False)
        return time.perf_counter() - start, sum(len(r.outputs[0].token_ids) for r in results)

    # The first run of the process (the engine warmed up at start-up; what is left is the
    # user-visible first-run cost), then interleaved timed runs: token ids out vs text out.
    first_s, _ = one_run(False)
    runs: dict[str, list[float]] = {"ids": [], "text": []}
    produced = 0
    for _ in range(args.num_iters):
        for label in ("ids", "text") if args.text else ("ids",):
            elapsed, produced = one_run(label == "text")
            runs[label].append(elapsed)
    row: dict[str, Any] = {"load_s": load_s, "first_run_s": first_s, "output_tokens": produced}
    for label, times in runs.items():
        if times:
            med = statistics.median(times)
            row[f"{label}_runs_s"] = times
            row[f"{label}_tok_s_median"] = produced / med
            row[f"{label}_tok_s_min_max"] = [produced / max(times), produced / min(times)]
    row["elapsed_s"] = statistics.median(runs["ids"])
    if runs["text"]:
        row["text_over_ids"] = row["text_tok_s_median"] / row["ids_tok_s_median"]
    return row


def _hf_model(name: str, device: str) -> Any:
    import torch
    from transformers import AutoModelForCausalLM

    config = model_config(name)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.eval()


def run_hf_cb(
    name: str, prompts: list[list[int]], outs: list[int], args: argparse.Namespace
) -> dict[str, Any]:
    from transformers import GenerationConfig

    model = _hf_model(name, args.device)
    gen = GenerationConfig(
        do_sample=True,
        temperature=0.6,
        top_k=0,
        top_p=1.0,
        max_new_tokens=max(outs),
        eos_token_id=-1,  # never produced: every request runs to its max_new_tokens
        pad_token_id=0,
    )

    def run(ps: list[list[int]], ns: list[int]) -> int:
        produced = 0
        # No inference_mode here: the manager's thread updates tensors created by this one.
        with model.continuous_batching_context_manager(
            generation_config=gen, block=True, timeout=5
        ) as manager:
            ids = [
                manager.add_request(p, max_new_tokens=n, eos_token_id=-1) for p, n in zip(ps, ns, strict=True)
            ]
            pending = set(ids)
            while pending:
                result = manager.get_result(timeout=1)
                if result is None:
                    if not manager.is_running():
                        raise RuntimeError("HF continuous batching stopped early")
                    continue
                if result.is_finished() and result.request_id in pending:
                    if result.error is not None:
                        raise RuntimeError(f"HF continuous batching: {result.error}")
                    pending.discard(result.request_id)
                    produced += len(result.generated_tokens)
        return produced

    run([prompts[0][:100]] * 2, [8, 8])  # warm-up
    start = time.perf_counter()
    produced = run(prompts, outs)
    return {"elapsed_s": time.perf_counter() - start, "output_tokens": produced}


def run_hf_padded(
    name: str, prompts: list[list[int]], outs: list[int], args: argparse.Namespace
) -> dict[str, Any]:
    import torch

    model = _hf_model(name, args.device)
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))

    def run_batch(idx: list[int]) -> int:
        width = max(len(prompts[i]) for i in idx)
        ids = torch.zeros((len(idx), width), dtype=torch.long)
        mask = torch.zeros((len(idx), width), dtype=torch.long)
        for row, i in enumerate(idx):  # left padding
            ids[row, width - len(prompts[i]) :] = torch.tensor(prompts[i])
            mask[row, width - len(prompts[i]) :] = 1
        new = max(outs[i] for i in idx)
        with torch.inference_mode():
            model.generate(
                input_ids=ids.to(args.device),
                attention_mask=mask.to(args.device),
                do_sample=True,
                temperature=0.6,
                top_k=0,
                max_new_tokens=new,
                min_new_tokens=new,
                pad_token_id=0,
            )
        return sum(outs[i] for i in idx)  # tokens past a request's own length are waste, not output

    run_batch(order[:2])  # warm-up (short prompts)
    start = time.perf_counter()
    produced = 0
    for b in range(0, len(order), args.hf_batch_size):
        produced += run_batch(order[b : b + args.hf_batch_size])
    return {"elapsed_s": time.perf_counter() - start, "output_tokens": produced}


def worker(args: argparse.Namespace) -> None:
    data = json.loads(Path(args.prompts).read_text())
    prompts, outs = data["prompts"][: args.limit], data["outputs"][: args.limit]
    if args.system == "hallm":
        result = run_hallm(args.model_dir, prompts, outs, args)
    elif args.system == "hf_cb":
        result = run_hf_cb(args.model, prompts, outs, args)
    else:
        result = run_hf_padded(args.model, prompts, outs, args)
    result.update(
        system=args.system,
        model=args.model,
        requests=len(prompts),
        prompt_tokens=sum(len(p) for p in prompts),
        output_tokens_per_s=result["output_tokens"] / result["elapsed_s"],
    )
    Path(args.result).write_text(json.dumps(result))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="qwen2.5-0.5b")
    p.add_argument("--systems", default="hallm,hf_cb,hf_padded")
    p.add_argument("--num-seqs", type=int, default=256)
    p.add_argument("--hf-cb-requests", type=int, default=32)
    p.add_argument("--hf-padded-requests", type=int, default=64)
    p.add_argument("--hf-batch-size", type=int, default=64)
    p.add_argument("--max-num-batched-tokens", type=int, default=8192)
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument(
        "--fixed-len",
        help="IN,OUT: every request has IN random prompt tokens and OUT output tokens (G2), and the "
        "report adds the decode roofline at --max-num-seqs resident requests",
    )
    p.add_argument("--enforce-eager", action="store_true")
    p.add_argument("--tensor-parallel-size", "-tp", type=int, default=1, help="hallm's ranks (GPUs)")
    p.add_argument("--distributed-executor-backend", default=None, help="hallm's executor: mp | ray")
    p.add_argument("--num-iters", type=int, default=3, help="timed hallm runs after its first run (median)")
    p.add_argument("--text", action="store_true", help="hallm also runs text out (detokenized), interleaved")
    p.add_argument("--device", default="cuda")
    p.add_argument("--timeout", type=int, default=300, help="seconds per system")
    p.add_argument("--out", default="benchmarks/results/raw")
    # worker mode
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--system", help=argparse.SUPPRESS)
    p.add_argument("--model-dir", help=argparse.SUPPRESS)
    p.add_argument("--prompts", help=argparse.SUPPRESS)
    p.add_argument("--limit", type=int, help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        worker(args)
        return

    out = Path(args.out)
    tmp = Path(tempfile.mkdtemp(prefix="hallm-g1-"))
    model_dir = write_model_dir(args.model, tmp / "model")
    if args.fixed_len:
        import random

        in_len, out_len = (int(x) for x in args.fixed_len.split(","))
        rng = random.Random(0)
        prompts = [[rng.randint(0, 10000) for _ in range(in_len)] for _ in range(args.num_seqs)]
        outs = [out_len] * args.num_seqs
    else:
        prompts, outs = g1_workload(args.num_seqs)
    prompt_file = tmp / "prompts.json"
    prompt_file.write_text(json.dumps({"prompts": prompts, "outputs": outs}))
    print(
        f"{'G2' if args.fixed_len else 'G1'} {args.model}: {len(prompts)} requests, {sum(map(len, prompts))} prompt tokens, "
        f"{sum(outs)} output tokens",
        flush=True,
    )
    limits = {"hallm": args.num_seqs, "hf_cb": args.hf_cb_requests, "hf_padded": args.hf_padded_requests}
    rows = []
    for system in args.systems.split(","):
        result_file = tmp / f"{system}.json"
        cmd = (
            [
                sys.executable,
                __file__,
                "--worker",
                "--system",
                system,
                "--model",
                args.model,
                "--model-dir",
                str(model_dir),
                "--prompts",
                str(prompt_file),
                "--limit",
                str(limits[system]),
                "--result",
                str(result_file),
                "--device",
                args.device,
                "--hf-batch-size",
                str(args.hf_batch_size),
                "--max-num-batched-tokens",
                str(args.max_num_batched_tokens),
                "--max-num-seqs",
                str(args.max_num_seqs),
                "--num-iters",
                str(args.num_iters),
                "--tensor-parallel-size",
                str(args.tensor_parallel_size),
            ]
            + (
                ["--distributed-executor-backend", args.distributed_executor_backend]
                if args.distributed_executor_backend
                else []
            )
            + (["--enforce-eager"] if args.enforce_eager else [])
            + (["--text"] if args.text else [])
        )
        start = time.perf_counter()
        try:
            proc = subprocess.run(cmd, timeout=args.timeout, capture_output=True, text=True, check=False)
            ok = proc.returncode == 0 and result_file.exists()
            if not ok:
                print(
                    f"{system} failed (rc {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}",
                    flush=True,
                )
            row = (
                json.loads(result_file.read_text())
                if ok
                else {"system": system, "error": f"rc {proc.returncode}"}
            )
        except subprocess.TimeoutExpired:
            row = {"system": system, "error": f"timeout after {args.timeout} s"}
        row["wall_s"] = time.perf_counter() - start
        row["model"] = args.model
        rows.append(row)
        print(json.dumps(row), flush=True)
    record = {
        "benchmark": "G2" if args.fixed_len else "G1",
        "model": args.model,
        "tensor_parallel_size": args.tensor_parallel_size,
        "executor": args.distributed_executor_backend,
        "env": environment(),
        "rows": rows,
    }
    if args.fixed_len and args.device == "cuda":
        from benchmarks.gpu_common import copy_bandwidth, kv_bytes_per_token, weight_bytes_read

        # Decode roofline with B requests resident at the mean context (IN + OUT/2): B tokens per
        # step that moves all weights once plus every resident request's KV. Under tensor
        # parallelism each GPU moves its share: the floor uses the bandwidth of all GPUs used.
        bw = copy_bandwidth() * args.tensor_parallel_size
        b = min(args.max_num_seqs, args.num_seqs)
        step_bytes = weight_bytes_read(args.model) + b * (in_len + out_len / 2) * kv_bytes_per_token(
            args.model
        )
        ceiling = b / (step_bytes / bw)
        record.update(copy_bw_gbps=bw / 1e9, resident=b, decode_ceiling_tok_s=ceiling)
        for r in rows:
            if "error" not in r:
                r["pct_of_decode_roofline"] = 100 * r["output_tokens_per_s"] / ceiling
        print(f"copy BW {bw / 1e9:.0f} GB/s; decode roofline at {b} resident requests: {ceiling:.0f} tok/s")
    append_jsonl(out / "g1.jsonl", record)
    base = next((r for r in rows if r["system"] == "hallm" and "error" not in r), None)
    print(f"\n{record['benchmark']} {args.model} (output tokens/s):")
    for r in rows:
        if "error" in r:
            print(f"  {r['system']:10} ERROR {r['error']}")
            continue
        ratio = (
            f"  hallm/this = {base['output_tokens_per_s'] / r['output_tokens_per_s']:.1f}x" if base else ""
        )
        roof = f"  {r['pct_of_decode_roofline']:.0f}% of roofline" if "pct_of_decode_roofline" in r else ""
        print(
            f"  {r['system']:10} {r['output_tokens_per_s']:10.0f} tok/s  ({r['requests']} req, "
            f"{r['output_tokens']} tok in {r['elapsed_s']:.1f} s){ratio}{roof}"
        )
        if "ids_tok_s_min_max" in r:
            lo, hi = r["ids_tok_s_min_max"]
            print(
                f"  {'':10} ids: median of {len(r['ids_runs_s'])} runs, min-max {lo:.0f}-{hi:.0f} tok/s; "
                f"first run of the process {r['first_run_s']:.2f} s vs median {r['elapsed_s']:.2f} s"
            )
        if "text_over_ids" in r:
            lo, hi = r["text_tok_s_min_max"]
            print(
                f"  {'':10} text: {r['text_tok_s_median']:.0f} tok/s (min-max {lo:.0f}-{hi:.0f}), "
                f"text/ids = {r['text_over_ids']:.3f}"
            )


if __name__ == "__main__":
    main()
