"""The API process of `hallm serve` alone: its CPU per request and how fast a burst gets through it
to the engine, with the engine replaced by a stand-in of fixed speed.

    .venv/bin/python benchmarks/api_process.py [--num-prompts 1000] [--input-len 1024]
        [--output-len 128] [--step-ms 2.2] [--prompts-per-step 8] [--iters 3]
        [--variants shipped,interpreter-gc] [--api-server-counts 1,2] [--py-spy DIR]

On a GPU the served/offline gap of a small model is the burst's arrival: 1,000 requests reach the
engine over ~1 s through the API process (gpu.md, run 21), which meanwhile streams every running
request's tokens. This measures that process on any host: the real `hallm serve` (uvicorn,
httptools, the routes, the engine client and its ZMQ sockets, detokenization, SSE), driven by the
real `hallm bench serve`, with the engine process swapped for `standin_engine`: it speaks the
engine protocol, admits up to `--prompts-per-step` waiting requests a step (a step of 8,192
prompt tokens holds 8 prompts of 1,024), and every `--step-ms` gives each running request one
token (a random id the covering tokenizer decodes to a word) until `--output-len`. Its speed does
not depend on the host, so what moves the numbers is the API process (and the client beside it,
which on a small machine shares its cores).

Each timed run starts a fresh server. Printed per run and as medians per variant and number of
API server processes (`--api-server-counts`; runs alternate, after `--warmup-iters` untimed runs):
  api_cpu_us     the API processes' CPU time (from /proc: the server's process tree less the
                 stand-in's own) over the burst, per request
  gc_*           the first API process's cycle collections once serving (young, full) and their
                 CPU time
  arrival_s      first to last AddRequest received by the engine
  steps          steps the stand-in ran from the first arrival; `ideal` is the count with every
                 request there at once
  output_tok_s   `hallm bench serve`'s output tokens/s, and its share of the ideal

The model directory is Qwen2.5-0.5B's config with a tokenizer covering its vocabulary
(gpu_common.write_model_dir); nothing is loaded but the tokenizer. `--py-spy DIR` records the
first API process and the stand-in during the last run (summaries DIR/pyspy-{api,engine}.txt).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections import deque
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

#: The stand-in's settings, JSON, from the benchmark to the server's spawned engine process.
STANDIN_ENV = "HALLM_BENCHMARK_STANDIN_ENGINE"


def standin_engine(
    config_conn: Any, input_addresses: list[str], output_addresses: list[str], log_level: int = 0
) -> None:
    """Target of the engine process in the server under test: `run_engine_process`'s protocol with
    a fixed-speed engine instead of a model (settings from $HALLM_BENCHMARK_STANDIN_ENGINE); each
    request's tokens go back to the API server that sent it."""
    import signal

    import zmq

    from hallm.core.engine_protocol import (
        AbortRequests,
        AddRequest,
        EngineStats,
        Ready,
        RequestDelta,
        Shutdown,
        StepOutputs,
        make_encoder,
        request_decoder,
    )

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    settings = json.loads(os.environ[STANDIN_ENV])
    step_s = settings["step_ms"] / 1000
    per_step, max_seqs, vocab = settings["prompts_per_step"], settings["max_num_seqs"], settings["vocab"]
    received = config_conn.recv()
    config_conn.close()
    if received is None:
        return
    config, _ = received
    ctx = zmq.Context()
    inbox = ctx.socket(zmq.PULL)
    for address in input_addresses:
        inbox.connect(address)
    outboxes = []
    for address in output_addresses:
        outbox = ctx.socket(zmq.PUSH)
        outbox.setsockopt(zmq.SNDHWM, 0)
        outbox.connect(address)
        outboxes.append(outbox)
    encoder, decoder = make_encoder(), request_decoder()

    def stats(running: int, waiting: int) -> EngineStats:
        return EngineStats(running, waiting, 0.0, 1 << 20, 1 << 20, 0, 0, 0)

    ready = encoder.encode(Ready(os.getpid(), 1 << 20, 1 << 20, 16, config.model.max_model_len, stats(0, 0)))
    for outbox in outboxes:
        outbox.send(ready)
    rng = random.Random(0)
    words = [rng.randrange(259, vocab) for _ in range(4096)]  # ids past the specials and bytes
    waiting: deque[tuple[str, int, int]] = deque()  # (request id, max tokens, API server)
    running: dict[str, list[int]] = {}  # request id -> [tokens left, API server]
    cpu_at_first_arrival = 0.0
    arrivals: list[float] = []
    step_times: list[float] = []
    next_step = time.perf_counter()
    while True:
        while inbox.poll(0):
            msg = decoder.decode(inbox.recv())
            if isinstance(msg, AddRequest):
                if not arrivals:
                    cpu_at_first_arrival = time.process_time()
                arrivals.append(time.perf_counter())
                waiting.append((msg.request_id, msg.params.max_tokens or 16, msg.client))
            elif isinstance(msg, AbortRequests):
                gone = set(msg.request_ids)
                for rid in gone & running.keys():
                    del running[rid]
                waiting = deque(w for w in waiting if w[0] not in gone)
            elif isinstance(msg, Shutdown):
                cpu_s = time.process_time() - cpu_at_first_arrival
                with open(settings["stats_path"], "w") as f:
                    json.dump({"arrivals": arrivals, "steps": step_times, "cpu_s": cpu_s}, f)
                inbox.close(linger=0)
                for outbox in outboxes:
                    outbox.close()
                ctx.term()
                return
        now = time.perf_counter()
        if now < next_step:
            inbox.poll(max(1, int((next_step - now) * 1000)))
            continue
        next_step = max(next_step + step_s, now)
        for _ in range(min(per_step, max_seqs - len(running), len(waiting))):
            rid, max_tokens, client = waiting.popleft()
            running[rid] = [max_tokens, client]
        if not running:
            continue
        step_times.append(now)
        steps = len(step_times)
        outputs: list[list[RequestDelta]] = [[] for _ in outboxes]
        for rid, left in list(running.items()):
            left[0] -= 1
            done = left[0] == 0
            outputs[left[1]].append(
                RequestDelta(rid, [words[(steps + left[0]) % len(words)]], None, "length" if done else None)
            )
            if done:
                del running[rid]
        step_stats = stats(len(running), len(waiting))
        for outbox, deltas in zip(outboxes, outputs, strict=True):
            outbox.send(encoder.encode(StepOutputs(deltas, step_stats)))


def count_gc(path: str) -> None:
    """Count this process's cycle collections once it serves (after its start-up heap is frozen)
    and their CPU time, by generation; written to `path` (JSON) at exit."""
    import atexit
    import gc

    import hallm.core.server_gc as server_gc
    from benchmarks.server_gc import Collections

    collections = Collections()
    prepare = server_gc.prepare_server_gc

    def prepare_then_count() -> int:
        frozen = prepare()
        gc.callbacks.append(collections)
        return frozen

    server_gc.prepare_server_gc = prepare_then_count

    def write() -> None:
        record = {
            "collections": collections.counts,
            "cpu_s": collections.cpu_s,
            "threshold": gc.get_threshold(),
        }
        with open(path, "w") as f:
            json.dump(record, f)

    atexit.register(write)


def serve_standin(argv: list[str]) -> int:
    """`hallm serve argv...` with `standin_engine` as its engine process."""
    import hallm.core.engine_process as engine_process
    from benchmarks.variants import apply
    from hallm.entrypoints.cli import main

    engine_process.run_engine_process = standin_engine
    settings = json.loads(os.environ[STANDIN_ENV])
    apply(settings["variant"])
    count_gc(settings["gc_path"])
    return int(main(["serve", *argv]) or 0)


def ideal_steps(num_prompts: int, output_len: int, per_step: int, max_seqs: int) -> int:
    """Steps the stand-in takes with every request waiting from the start."""
    waiting, running, steps = num_prompts, [], 0
    while waiting or running:
        for _ in range(min(per_step, max_seqs - len(running), waiting)):
            running.append(output_len)
            waiting -= 1
        steps += 1
        running = [r - 1 for r in running if r > 1]
    return steps


def tree_cpu_seconds(pid: int) -> float:
    """CPU seconds of process `pid` and all its descendants (the server's processes)."""
    from benchmarks.server_processes import children, cpu_seconds

    total, todo = 0.0, [pid]
    while todo:
        p = todo.pop()
        with contextlib.suppress(OSError):
            total += cpu_seconds(p)
            todo += children(p)
    return total


def one_run(
    args: argparse.Namespace, tmp: Path, config: tuple[str, int], seed: int, spy: bool
) -> dict[str, float]:
    """Start the server (`config`: a variant and the number of API server processes) with a fresh
    stand-in, run the burst, stop it; the run's numbers (the stand-in reports its arrivals and its
    own CPU time when it is shut down)."""
    from benchmarks.gpu_common import model_config
    from benchmarks.gpu_served import _free_port, _log_tail, _stop_group, start_server
    from benchmarks.server_processes import start_py_spy, stop_py_spy

    variant, api_servers = config

    vocab = int(model_config("qwen2.5-0.5b").vocab_size)
    stats_path, gc_path = tmp / f"standin-{seed}.json", tmp / f"gc-{seed}.json"
    settings = {
        "step_ms": args.step_ms,
        "prompts_per_step": args.prompts_per_step,
        "max_num_seqs": args.max_num_seqs,
        "vocab": vocab,
        "stats_path": str(stats_path),
        "gc_path": str(gc_path),
        "variant": variant,
    }
    os.environ[STANDIN_ENV] = json.dumps(settings)  # the server and its spawned stand-in read it
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    serve = [sys.executable, __file__, "serve-standin", str(tmp / "model"), "--device", "cpu"]
    serve += ["--max-model-len", str(args.input_len + args.output_len), "--port", str(port)]
    serve += ["--max-num-seqs", str(args.max_num_seqs), "--disable-uvicorn-access-log"]
    serve += ["--api-server-count", str(api_servers)]
    bench = [sys.executable, "-m", "hallm.entrypoints.cli", "bench", "serve", "--base-url", f"{url}/v1"]
    bench += ["--input-len", str(args.input_len), "--output-len", str(args.output_len)]
    bench += ["--vocab-size", str(vocab), "--num-prompts", str(args.num_prompts), "--seed", str(seed)]
    result_json = tmp / f"bench-{seed}.json"
    server = start_server(serve, url, tmp / f"server-{seed}.log", 300)
    spies = start_py_spy(server.pid, tmp) if spy else {}
    try:
        cpu0 = tree_cpu_seconds(server.pid)
        subprocess.run(
            [*bench, "--output-json", str(result_json)], check=True, stdout=subprocess.DEVNULL, timeout=600
        )
        api_cpu = tree_cpu_seconds(server.pid) - cpu0
    finally:
        stop_py_spy(spies, Path(args.py_spy or tmp))
        _stop_group(server, grace_s=30.0)
    result = json.loads(result_json.read_text())
    gc_stats = json.loads(gc_path.read_text())
    standin = json.loads(stats_path.read_text())
    arrivals = standin["arrivals"][1:]  # the first is the client's warm-up request
    if len(arrivals) != args.num_prompts:
        raise SystemExit(
            f"the stand-in engine received {len(arrivals)} of {args.num_prompts} requests; the "
            f"server's log ends:\n{_log_tail(tmp / f'server-{seed}.log')}"
        )
    return {
        "requests_arrived": len(arrivals),
        "api_cpu_us": 1e6 * (api_cpu - standin["cpu_s"]) / args.num_prompts,
        "arrival_s": arrivals[-1] - arrivals[0],
        "steps": sum(t >= arrivals[0] for t in standin["steps"]),
        "output_tok_s": result["output_throughput"],
        "ttft_p50_ms": result["ttft_ms"]["p50"],
        "client_cpu_share": result.get("client_cpu_s", 0.0) / result["duration_s"],
        "gc_young": gc_stats["collections"][0],
        "gc_full": gc_stats["collections"][2],
        "gc_cpu_ms": 1000 * sum(gc_stats["cpu_s"]),
    }


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "serve-standin":
        return serve_standin(sys.argv[2:])
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--num-prompts", type=int, default=1000)
    p.add_argument("--input-len", type=int, default=1024)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--step-ms", type=float, default=2.2, help="the stand-in engine's step period")
    p.add_argument("--prompts-per-step", type=int, default=8)
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument("--iters", type=int, default=3, help="timed runs of each variant (after the warm-up runs)")
    p.add_argument(
        "--warmup-iters", type=int, default=1, help="untimed runs of the first variant before them"
    )
    p.add_argument(
        "--variants",
        default="shipped",
        help="comma-separated: shipped (as released) and variants of benchmarks/variants.py that "
        "change the API process (interpreter-gc); runs alternate between them",
    )
    p.add_argument(
        "--api-server-counts",
        default="1",
        help="comma-separated numbers of API server processes (--api-server-count) to run each variant with",
    )
    p.add_argument(
        "--py-spy",
        default=None,
        help="record the server's processes in the last run; summaries to this folder",
    )
    p.add_argument("--out", default=None, help="append the result as one JSON line to this file")
    args = p.parse_args()
    variants = args.variants.split(",")
    for v in variants:
        if v not in ("shipped", "interpreter-gc"):
            raise SystemExit(
                f"--variants: {v!r} does not change the API process; use shipped or interpreter-gc"
            )

    from benchmarks.gpu_common import write_model_dir

    tmp = Path(tempfile.mkdtemp(prefix="hallm-api-"))
    os.environ["HF_HUB_OFFLINE"] = "1"
    write_model_dir("qwen2.5-0.5b", tmp / "model", cover_vocab=True)
    ideal = ideal_steps(args.num_prompts, args.output_len, args.prompts_per_step, args.max_num_seqs)
    ideal_tok_s = args.num_prompts * args.output_len / (ideal * args.step_ms / 1000)
    configs = [(v, int(n)) for v in variants for n in args.api_server_counts.split(",")]
    names = {c: c[0] if c[1] == 1 else f"{c[0]}/api-x{c[1]}" for c in configs}
    runs: dict[str, list[dict[str, float]]] = {names[c]: [] for c in configs}
    try:
        for _ in range(args.warmup_iters):  # file caches, imports
            one_run(args, tmp, configs[0], seed=0, spy=False)
        seed = 1
        for i in range(args.iters):
            for c in configs:
                last = i == args.iters - 1 and c == configs[-1]
                run = one_run(args, tmp, c, seed, spy=bool(args.py_spy) and last)
                seed += 1
                print(f"{names[c]:15s} " + json.dumps({k: round(x, 3) for k, x in run.items()}), flush=True)
                runs[names[c]].append(run)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"ideal: {ideal} steps, {ideal_tok_s:.0f} output tok/s (every request there at once)")
    medians = {}
    for v, rs in runs.items():
        m = {k: statistics.median(r[k] for r in rs) for k in rs[0]}
        medians[v] = m
        print(
            f"{v:15s} median of {len(rs)}: API processes {m['api_cpu_us']:.0f} us CPU a request, "
            f"collections {m['gc_young']:.0f} young / {m['gc_full']:.0f} full ({m['gc_cpu_ms']:.0f} ms CPU), "
            f"arrival {m['arrival_s']:.2f} s, {m['steps']:.0f} steps, {m['output_tok_s']:.0f} output tok/s "
            f"({m['output_tok_s'] / ideal_tok_s:.3f} of ideal), TTFT p50 {m['ttft_p50_ms']:.0f} ms, "
            f"client {100 * m['client_cpu_share']:.0f}% of a core"
        )
    if args.out:
        record = {"benchmark": "api_process", "args": vars(args), "runs": runs, "median": medians}
        record["ideal_steps"], record["ideal_output_tok_s"] = ideal, ideal_tok_s
        with open(args.out, "a") as f:
            f.write(json.dumps(record) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
