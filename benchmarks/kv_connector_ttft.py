"""Issue 22's benchmark: time to first token for a long shared prefix that the device's prefix
cache no longer holds, recomputed vs loaded through the `offload` connector (host memory) and
the `shared_storage` connector (a directory), in one process on the same prompts.

Each engine (plain, offload, shared_storage with kv_both) first serves the prefix once (the
connectors save it), then `--repeats` times: reset the device prefix cache (the prefix is gone
from the device, as after an eviction) and time a request of prefix + a new `--suffix-len`-token
suffix with max_tokens=1. A fourth engine keeps the prefix in its device prefix cache: the floor
any connector can reach. Reported: median TTFT per engine, the ratio against recompute measured
in the same run, and whether the first tokens agree. CPU time of the process is given too (a
shared machine swings wall time).

    .venv/bin/python benchmarks/kv_connector_ttft.py [--model PATH] [--prefix-len 1024] [--threads 2]
"""

from __future__ import annotations

import argparse
import gc
import random
import statistics
import tempfile
import time
from typing import Any


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default=None, help="default: SmolLM2-135M-Instruct")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--prefix-len", type=int, default=1024)
    p.add_argument("--suffix-len", type=int, default=16)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--enforce-eager", action="store_true", help="no decode graphs (TTFT is prefill)")
    p.add_argument("--load-format", default="auto", help="dummy: random weights of the model's shapes")
    p.add_argument(
        "--gpu-memory-utilization", type=float, default=0.4, help="per engine (they run one after another)"
    )
    args = p.parse_args()

    import torch

    from hallm.core.sampling_params import SamplingParams
    from hallm.entrypoints.llm import LLM

    if args.threads:
        torch.set_num_threads(args.threads)
    rng = random.Random(0)
    prefix = [rng.randrange(1000, 20000) for _ in range(args.prefix_len)]
    suffixes = [[rng.randrange(1000, 20000) for _ in range(args.suffix_len)] for _ in range(args.repeats)]
    storage = tempfile.mkdtemp(prefix="hallm-kv-bench-")
    configs: dict[str, dict[str, Any] | None] = {
        "recompute": None,
        "device_prefix_hit": None,  # the floor: the prefix still in the device's prefix cache
        "offload": {"kv_connector": "offload", "kv_connector_extra_config": {"cpu_bytes": 1 << 30}},
        "shared_storage": {
            "kv_connector": "shared_storage",
            "kv_connector_extra_config": {"shared_storage_path": storage},
        },
    }
    params = SamplingParams(temperature=0.0, max_tokens=1)
    results: dict[str, tuple[float, float, list[int]]] = {}
    for name, kv in configs.items():
        llm = LLM(
            model=args.model,
            device=args.device,
            dtype=args.dtype,
            max_model_len=args.prefix_len + args.suffix_len + 8,
            kv_transfer_config=kv,
            load_format=args.load_format,
            enforce_eager=args.enforce_eager,
            **({"gpu_memory_utilization": args.gpu_memory_utilization} if args.device != "cpu" else {}),
        )
        llm.generate([{"prompt_token_ids": [*prefix, 5]}], params, use_tqdm=False)  # saves the prefix
        walls, cpus, firsts = [], [], []
        for suffix in suffixes:
            if name != "device_prefix_hit":
                llm.engine.reset_prefix_cache()
            w0, c0 = time.perf_counter(), time.process_time()
            out = llm.generate([{"prompt_token_ids": prefix + suffix}], params, use_tqdm=False)[0]
            walls.append(time.perf_counter() - w0)
            cpus.append(time.process_time() - c0)
            firsts.append(out.outputs[0].token_ids[0])
        loaded = llm.engine.get_stats().get("kv_connector_tokens_loaded", 0)
        results[name] = (statistics.median(walls), statistics.median(cpus), firsts)
        print(
            f"{name:15s} TTFT median {results[name][0] * 1e3:8.1f} ms wall, {results[name][1] * 1e3:8.1f} ms CPU; "
            f"tokens loaded {loaded}"
        )
        shutdown = getattr(llm.engine, "shutdown", None)
        if shutdown is not None:
            shutdown()
        del llm
        gc.collect()
        if args.device == "cuda":
            torch.cuda.empty_cache()
    base_wall, base_cpu, base_first = results["recompute"]
    print(f"\nprefix {args.prefix_len} tokens + suffix {args.suffix_len}, device {args.device}, {args.dtype}")
    for name, (wall, cpu, firsts) in results.items():
        print(
            f"{name:15s} {base_wall / wall:5.2f}x faster than recompute (wall), {base_cpu / cpu:5.2f}x (CPU); "
            f"same first tokens: {firsts == base_first}"
        )


if __name__ == "__main__":
    main()
