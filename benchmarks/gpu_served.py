"""Served vs offline on one device: `hallm bench throughput` and `hallm serve` + `hallm bench serve`
on the same dummy-weight model directory (real shapes), engine flags and workload, one after the
other from this process (the offline run exits before the server starts, so each has the device).

Workload: `--num-prompts` random prompts of exactly `--input-len` token ids, each generating
exactly `--output-len` tokens (ignore_eos), temperature 1 in both paths (`bench throughput`'s
sampling). Prefix caching is off in both, so repeated runs and the serve warm-up request
re-use no KV.

  offline      `hallm bench throughput`: `--num-iters-warmup` untimed runs, then `--num-iters`
               timed runs of the workload; median and min-max output tokens/s
  saturation   `hallm bench serve` with every request sent at once, `--num-iters-warmup` untimed
               runs then `--num-iters` timed ones (a new seed each, so new prompts): output
               tokens/s (median, min-max), TTFT, TPOT and ITL of the median run (median and p99)
  c=1          `hallm bench serve --max-concurrency 1` on `--concurrency-1-prompts` requests: the
               latency of one request alone (TTFT, TPOT, ITL)

During the timed saturation runs the CPU time of the server's processes is read from /proc (Linux):
the API processes (HTTP, detokenization, SSE; all of them with `--api-server-count`) and the
engine process, each as a share of one core
over the whole `bench serve` runs (their start-up and the one warm-up request each sends first
included), and the client's own CPU as a share of one core over its timed part. The API process or the
client near 100% of a core limits the served throughput; the engine process's share also counts
its waits for the GPU, which spin on CUDA, so near 100% there shows no host limit by itself.

The model directory's tokenizer covers the model's vocabulary (gpu_common.covering_tokenizer),
so every sampled id streams text: a request with no text would have no ITL and a TTFT taken at
its first chunk (counted as `no_text_requests`; this script fails if any).

With `--timeline` both paths run at `--log-level debug`, whose per-request and per-step lines
(`LLMEngine`'s, stamped with one host clock) give the engine's step timeline of the last offline
run and of the last saturation run: when requests arrived, how full the steps were, how long
prompt and decode steps took (`benchmarks/step_timeline.py`; a line costs microseconds).

The JSON (one line appended to OUT/served.jsonl, and OUT/served-MODEL.json) holds every command
run (their temporary model directory is removed at the end: this script re-creates it), the
three results, served/offline output tokens/s at saturation, and the c=1 TPOT. The
server runs in its own session and is stopped with SIGTERM, then its whole process group killed,
on success, error or interrupt.

    python benchmarks/gpu_served.py --model qwen2.5-0.5b --out benchmarks/results/raw
    python benchmarks/gpu_served.py --model tiny --device cpu --num-prompts 16 --input-len 64 \\
        --output-len 16 --concurrency-1-prompts 4 --num-iters 1 --out /tmp/served
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.gpu_common import append_jsonl, environment, model_config, write_model_dir
from benchmarks.server_processes import (
    engine_pid_in_log,
    py_spy_binary,
    server_cpu,
    start_py_spy,
    stop_py_spy,
)
from benchmarks.step_timeline import last_run, parse, summarize, table
from benchmarks.variants import SERVER_VARIANTS, VARIANTS

CLI = [sys.executable, "-m", "hallm.entrypoints.cli"]


class PhaseError(RuntimeError):
    """A phase (a subprocess) failed; the message carries the end of its log."""


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _log_tail(path: Path, chars: int = 4000) -> str:
    return path.read_text(errors="replace")[-chars:] if path.exists() else ""


def _stop_group(proc: subprocess.Popen[bytes], grace_s: float) -> None:
    """SIGTERM the process, wait `grace_s`, then SIGKILL whatever is left of its process group
    (it leads its own session, so the group holds it and every child it started)."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(grace_s)
    with contextlib.suppress(ProcessLookupError):  # raised when the group is gone: nothing left
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(10)


def run_phase(name: str, cmd: list[str], log: Path, timeout: float) -> None:
    """Run `cmd` in its own session, output to `log`; raise PhaseError on failure or timeout."""
    print(f"[{name}] {shlex.join(cmd)}", flush=True)
    start = time.perf_counter()
    with open(log, "wb") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        rc = proc.wait(timeout)
    except subprocess.TimeoutExpired:
        raise PhaseError(f"{name}: no exit after {timeout:.0f} s\n{_log_tail(log)}") from None
    finally:
        _stop_group(proc, grace_s=5.0)
    if rc != 0:
        raise PhaseError(f"{name}: exit {rc}\n{_log_tail(log)}")
    print(f"[{name}] done in {time.perf_counter() - start:.1f} s", flush=True)


def start_server(cmd: list[str], url: str, log: Path, timeout: float) -> subprocess.Popen[bytes]:
    """Start `hallm serve` in its own session and wait until GET /health answers 200."""
    import httpx

    print(f"[serve] {shlex.join(cmd)}", flush=True)
    start = time.perf_counter()
    with open(log, "wb") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        while time.perf_counter() - start < timeout:
            if proc.poll() is not None:
                raise PhaseError(f"serve: exited with {proc.returncode} before /health\n{_log_tail(log)}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    print(f"[serve] healthy after {time.perf_counter() - start:.1f} s", flush=True)
                    return proc
            time.sleep(0.5)
        raise PhaseError(f"serve: not healthy after {timeout:.0f} s\n{_log_tail(log)}")
    except BaseException:  # an error or SIGTERM while it starts: leave nothing running
        _stop_group(proc, grace_s=10.0)
        raise


def _latency(result: dict[str, Any]) -> dict[str, Any]:
    """One `bench serve` result reduced to what the report compares."""
    return {
        "completed": result["completed"],
        "failed": result["failed"],
        "no_text_requests": result.get("no_text_requests", 0),
        "duration_s": result["duration_s"],
        "output_tok_s": result["output_throughput"],
        "total_tok_s": result["total_token_throughput"],
        "ttft_ms": {"p50": result["ttft_ms"]["p50"], "p99": result["ttft_ms"]["p99"]},
        "tpot_ms": {"p50": result["tpot_ms"]["p50"], "p99": result["tpot_ms"]["p99"]},
        "itl_ms": {"p50": result["itl_ms"]["p50"], "p99": result["itl_ms"]["p99"]},
    }


def _check(name: str, result: dict[str, Any], expected: int) -> None:
    if result["failed"] or result["completed"] != expected:
        raise PhaseError(f"{name}: {result['completed']}/{expected} completed, errors {result['errors'][:3]}")
    if result.get("no_text_requests"):
        raise PhaseError(
            f"{name}: {result['no_text_requests']} requests streamed no text (ids outside the tokenizer?)"
        )


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="qwen2.5-0.5b", help="qwen2.5-0.5b | llama-3.1-8b | tiny")
    p.add_argument("--device", default="cuda")
    p.add_argument("--num-prompts", type=int, default=512, help="requests of the offline and saturation runs")
    p.add_argument("--input-len", type=int, default=1024)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--concurrency-1-prompts", type=int, default=32, help="requests of the c=1 run")
    p.add_argument("--num-iters", type=int, default=3, help="timed offline and saturation runs (median)")
    p.add_argument("--num-iters-warmup", type=int, default=1, help="untimed runs of each path first")
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument("--max-num-batched-tokens", type=int, default=None)
    p.add_argument("--timeout", type=float, default=300.0, help="seconds each phase (subprocess) may take")
    p.add_argument("--out", default="benchmarks/results/raw")
    p.add_argument(
        "--timeline",
        action="store_true",
        help="run both paths at --log-level debug and compare the engine's step timelines of the last "
        "offline and the last saturation run (benchmarks/step_timeline.py)",
    )
    p.add_argument(
        "--server-variant",
        default="shipped",
        choices=sorted(SERVER_VARIANTS),
        help="run `hallm serve` as this variant of benchmarks/variants.py (an A/B of the API process)",
    )
    p.add_argument(
        "--engine-variant",
        default="shipped",
        choices=sorted(VARIANTS),
        help="run the offline benchmark and `hallm serve` with this engine variant of "
        "benchmarks/variants.py (an A/B of the engine, both paths)",
    )
    p.add_argument(
        "--api-server-count",
        type=int,
        default=1,
        help="`hallm serve --api-server-count`: HTTP server processes sharing the port and the engine",
    )
    p.add_argument(
        "--py-spy",
        action="store_true",
        help="sample the API and engine processes with py-spy during the last saturation run "
        "(OUT/pyspy-api.txt, OUT/pyspy-engine.txt: functions by share of samples)",
    )
    args = p.parse_args()
    if min(args.num_prompts, args.concurrency_1_prompts, args.num_iters, args.input_len) < 1:
        p.error("--num-prompts, --concurrency-1-prompts, --num-iters and --input-len must be >= 1")
    if args.output_len < 2:
        p.error("--output-len must be >= 2 (TPOT needs two output tokens)")
    if "shipped" not in (args.server_variant, args.engine_variant):
        p.error("--server-variant and --engine-variant: give one of them (an A/B changes one thing)")
    if args.py_spy:
        try:
            py_spy_binary()  # before any phase runs, not after the offline and served ones
        except FileNotFoundError as exc:
            p.error(f"--py-spy: {exc}")

    # SIGTERM (e.g. a runner's timeout) unwinds through the finally that stops the server.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    tmp = Path(tempfile.mkdtemp(prefix="hallm-served-"))
    try:
        return run(args, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def run(args: argparse.Namespace, tmp: Path) -> int:
    """Every phase, with `tmp` for the model directory and the results of the subprocesses."""
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    vocab = int(model_config(args.model).vocab_size)
    model_dir = write_model_dir(args.model, tmp / "model", cover_vocab=True)
    variant = args.engine_variant if args.engine_variant != "shipped" else args.server_variant
    name = f"served-{args.model}" + ("" if variant == "shipped" else f"-{variant}")
    name += "" if args.api_server_count == 1 else f"-api{args.api_server_count}"
    engine = [str(model_dir), "--device", args.device, "--load-format", "dummy", "--seed", "0"]
    engine += ["--dtype", "bfloat16" if args.device == "cuda" else "float32"]
    engine += ["--max-model-len", str(args.input_len + args.output_len)]
    engine += ["--max-num-seqs", str(args.max_num_seqs), "--no-enable-prefix-caching"]
    if args.max_num_batched_tokens:
        engine += ["--max-num-batched-tokens", str(args.max_num_batched_tokens)]
    sizes = ["--input-len", str(args.input_len), "--output-len", str(args.output_len)]
    print(
        f"{args.model} on {args.device}: {args.num_prompts} requests x {args.input_len} in / "
        f"{args.output_len} out; c=1: {args.concurrency_1_prompts} requests",
        flush=True,
    )

    commands: dict[str, Any] = {"script": shlex.join([sys.executable, *sys.argv])}
    cli = [*CLI, "--log-level", "debug"] if args.timeline else CLI
    if args.engine_variant != "shipped":
        cli = [sys.executable, str(Path(__file__).with_name("variants.py")), args.engine_variant, *cli[3:]]
    offline_json = tmp / "offline.json"
    offline_cmd = [*cli, "bench", "throughput", *engine, *sizes, "--num-prompts", str(args.num_prompts)]
    offline_cmd += ["--num-iters", str(args.num_iters), "--num-iters-warmup", str(args.num_iters_warmup)]
    offline_cmd += ["--output-json", str(offline_json)]
    commands["offline"] = shlex.join(offline_cmd)
    run_phase("offline", offline_cmd, out / f"{name}-offline.log", args.timeout)
    offline = json.loads(offline_json.read_text())
    offline_runs = [offline["output_tokens"] / s for s in offline["runs_s"]]
    offline_total_tok_s = statistics.median(
        (offline["prompt_tokens"] + offline["output_tokens"]) / s for s in offline["runs_s"]
    )

    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    server_cli = cli
    if args.server_variant != "shipped":
        server_cli = [
            sys.executable,
            str(Path(__file__).with_name("variants.py")),
            args.server_variant,
            *cli[3:],
        ]
    serve_cmd = [*server_cli, "serve", *engine, "--host", "127.0.0.1", "--port", str(port)]
    serve_cmd += ["--served-model-name", args.model, "--disable-uvicorn-access-log"]
    serve_cmd += ["--api-server-count", str(args.api_server_count)]
    commands["serve"] = shlex.join(serve_cmd)
    bench = [*CLI, "bench", "serve", "--base-url", f"{url}/v1", *sizes, "--vocab-size", str(vocab)]
    bench += ["--temperature", "1.0"]
    saturation: list[dict[str, Any]] = []
    server_log = out / f"{name}-server.log"
    last_run_log = (0, 0)  # the server log's bytes written during the last saturation run
    server = start_server(serve_cmd, url, server_log, args.timeout)
    engine_pid = engine_pid_in_log(server_log)
    try:
        commands["saturation"] = []
        cpu_s = {"api": 0.0, "engine": 0.0, "client": 0.0}
        timed_wall_s = 0.0  # the client's timed parts
        phase_wall_s = 0.0  # the runs whole, over which the server's CPU is read
        for i in range(args.num_iters_warmup + args.num_iters):
            phase_start = time.perf_counter()
            before = server_cpu(server.pid, engine_pid)
            result_json = tmp / f"saturation-{i}.json"
            cmd = [*bench, "--num-prompts", str(args.num_prompts), "--seed", str(i)]
            cmd += ["--output-json", str(result_json)]
            commands["saturation"].append(shlex.join(cmd))
            log_start = server_log.stat().st_size
            last = i == args.num_iters_warmup + args.num_iters - 1
            spies = start_py_spy(server.pid, tmp, engine_pid) if args.py_spy and last else {}
            try:
                run_phase(f"saturation {i}", cmd, out / f"{name}-saturation-{i}.log", args.timeout)
            finally:
                stop_py_spy(spies, out)
            last_run_log = (log_start, server_log.stat().st_size)
            result = json.loads(result_json.read_text())
            _check(f"saturation {i}", result, args.num_prompts)
            if i >= args.num_iters_warmup:
                saturation.append(_latency(result))
                after = server_cpu(server.pid, engine_pid)
                phase_wall_s += time.perf_counter() - phase_start
                timed_wall_s += result["duration_s"]
                for key in ("api", "engine"):
                    cpu_s[key] += after.get(key, 0.0) - before.get(key, 0.0)
                cpu_s["client"] += result.get("client_cpu_s", 0.0)
        c1_json = tmp / "c1.json"
        cmd = [*bench, "--num-prompts", str(args.concurrency_1_prompts), "--max-concurrency", "1"]
        cmd += ["--seed", "1000", "--output-json", str(c1_json)]
        commands["concurrency_1"] = shlex.join(cmd)
        run_phase("c=1", cmd, out / f"{name}-c1.log", args.timeout)
        c1_raw = json.loads(c1_json.read_text())
        _check("c=1", c1_raw, args.concurrency_1_prompts)
        c1 = _latency(c1_raw)
    finally:
        _stop_group(server, grace_s=60.0)
        print(f"[serve] stopped (exit {server.returncode})", flush=True)

    offline_tok_s = statistics.median(offline_runs)
    by_tok_s = sorted(saturation, key=lambda r: r["output_tok_s"])
    median_run = by_tok_s[(len(by_tok_s) - 1) // 2]
    served_tok_s = statistics.median(r["output_tok_s"] for r in saturation)
    record = {
        "benchmark": "served_vs_offline",
        "model": args.model,
        "device": args.device,
        "workload": {
            "num_prompts": args.num_prompts,
            "input_len": args.input_len,
            "output_len": args.output_len,
            "concurrency_1_prompts": args.concurrency_1_prompts,
            "temperature": 1.0,
            "ignore_eos": True,
            "prefix_caching": False,
            "num_iters": args.num_iters,
            "num_iters_warmup": args.num_iters_warmup,
        },
        "commands": commands,
        "server_variant": args.server_variant,
        "api_server_count": args.api_server_count,
        "engine_variant": args.engine_variant,
        "env": environment(),
        "offline": {
            "output_tok_s": offline_tok_s,
            "output_tok_s_min_max": [min(offline_runs), max(offline_runs)],
            "total_tok_s": offline_total_tok_s,
            "runs_s": offline["runs_s"],
            "first_run_s": offline["first_run_s"],
        },
        "saturation": {
            "output_tok_s": served_tok_s,
            "output_tok_s_min_max": [by_tok_s[0]["output_tok_s"], by_tok_s[-1]["output_tok_s"]],
            "median_run": median_run,
            "runs": saturation,
        },
        "concurrency_1": c1,
        # Share of one core over the timed saturation runs (bench serve's start-up included).
        "saturation_cpu_share": {
            "api": cpu_s["api"] / phase_wall_s,
            "engine": cpu_s["engine"] / phase_wall_s,
            "client": cpu_s["client"] / timed_wall_s,
        }
        if timed_wall_s and phase_wall_s
        else {},
        "served_over_offline_output_tok_s": served_tok_s / offline_tok_s,
        "served_over_offline_total_tok_s": statistics.median(r["total_tok_s"] for r in saturation)
        / offline_total_tok_s,
        "concurrency_1_tpot_ms": c1["tpot_ms"],
    }
    if args.timeline:
        with open(server_log, "rb") as f:
            f.seek(last_run_log[0])
            served_text = f.read(last_run_log[1] - last_run_log[0]).decode(errors="replace")
        offline_text = (out / f"{name}-offline.log").read_text(errors="replace")
        record["timeline"] = {
            "offline": summarize(last_run(parse(offline_text), args.num_prompts)),
            "served": summarize(last_run(parse(served_text), args.num_prompts)),
        }
    append_jsonl(out / "served.jsonl", record)
    (out / f"{name}.json").write_text(json.dumps(record, indent=2))

    def lat(r: dict[str, Any]) -> str:
        return "  ".join(
            f"{k.split('_')[0].upper()} p50 {r[k]['p50']:.2f} p99 {r[k]['p99']:.2f} ms"
            for k in ("ttft_ms", "tpot_ms", "itl_ms")
        )

    lo, hi = record["offline"]["output_tok_s_min_max"]
    slo, shi = record["saturation"]["output_tok_s_min_max"]
    print(
        f"\n{args.model} on {args.device}, server {args.server_variant}, engine {args.engine_variant} "
        f"(output tokens/s; median of {args.num_iters}, min-max):"
    )
    print(f"  offline     {offline_tok_s:10.1f}  ({lo:.1f}-{hi:.1f})")
    print(f"  saturation  {served_tok_s:10.1f}  ({slo:.1f}-{shi:.1f})  {lat(median_run)}")
    print(f"  c=1         {c1['output_tok_s']:10.1f}  {lat(c1)}")
    print(f"  served/offline at saturation: {record['served_over_offline_output_tok_s']:.3f}")
    share = record["saturation_cpu_share"]
    if share:
        print(
            f"  server CPU during the timed saturation runs: API processes {share['api']:.0%} of a core, "
            f"engine process {share['engine']:.0%}, benchmark client {share.get('client', 0.0):.0%}"
        )
    if args.timeline:
        print("\nengine step timeline of the last offline and the last saturation run (debug log):")
        print(table(record["timeline"]))
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except PhaseError as exc:
        print(f"FAILED: {exc}", file=sys.stderr, flush=True)
        sys.exit(1)
