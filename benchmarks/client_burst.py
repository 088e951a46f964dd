"""How fast `hallm bench serve` itself gets a burst of requests out: the client against a server
that answers every completion at once (two SSE chunks and [DONE], no engine).

    .venv/bin/python benchmarks/client_burst.py [--num-prompts 1000] [--input-len 1024] [--runs 3]

Served/offline ratios (gpu_served.py) time the burst's arrival at the engine; this is the part
of it the client alone takes on this host. Prints, per run, the client's wall time for the
burst, its CPU share of one core and the median time to first chunk. The server is uvicorn with
httptools and uvloop (what `hallm serve` runs on) and a bare ASGI app, in its own process.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

_CHUNK = (
    b'data: {"id":"x","object":"text_completion","created":0,"model":"m","choices":[{"index":0,'
    b'"text":" a","logprobs":null,"finish_reason":null,"stop_reason":null}]}\n\n'
)
_LAST = (
    b'data: {"id":"x","object":"text_completion","created":0,"model":"m","choices":[{"index":0,'
    b'"text":" b","logprobs":null,"finish_reason":"length","stop_reason":null}]}\n\ndata: [DONE]\n\n'
)


async def app(scope: dict, receive, send) -> None:  # type: ignore[no-untyped-def, type-arg]
    """A completions endpoint that answers at once; GET .../models names model "m"."""
    if scope["type"] != "http":
        return
    if scope["path"].endswith("/models"):
        body = json.dumps({"data": [{"id": "m"}]}).encode()
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-type", b"application/json")],
            }
        )
        await send({"type": "http.response.body", "body": body})
        return
    more = True
    while more:  # read the whole body, as a server must
        more = (await receive()).get("more_body", False)
    await send(
        {"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/event-stream")]}
    )
    await send({"type": "http.response.body", "body": _CHUNK, "more_body": True})
    await send({"type": "http.response.body", "body": _LAST})


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--num-prompts", type=int, default=1000)
    p.add_argument("--input-len", type=int, default=1024)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--port", type=int, default=18777)
    args = p.parse_args()
    root = Path(__file__).resolve().parents[1]
    uvicorn = [sys.executable, "-m", "uvicorn", "benchmarks.client_burst:app", "--port", str(args.port)]
    uvicorn += ["--http", "httptools", "--loop", "uvloop", "--log-level", "warning", "--no-access-log"]
    server = subprocess.Popen(uvicorn, cwd=root)
    base = f"http://127.0.0.1:{args.port}/v1"
    try:
        for _ in range(100):
            try:
                urllib.request.urlopen(f"{base}/models", timeout=1).read()
                break
            except OSError:
                time.sleep(0.1)
        with tempfile.TemporaryDirectory() as tmp:
            for run in range(args.runs):
                out = Path(tmp) / f"run-{run}.json"
                cmd = [sys.executable, "-m", "hallm.entrypoints.cli", "bench", "serve", "--base-url", base]
                cmd += ["--input-len", str(args.input_len), "--output-len", "2", "--vocab-size", "151936"]
                cmd += ["--num-prompts", str(args.num_prompts), "--seed", str(run), "--output-json", str(out)]
                subprocess.run(cmd, check=True, cwd=root, stdout=subprocess.DEVNULL)
                r = json.loads(out.read_text())
                print(
                    f"run {run}: {args.num_prompts} requests in {r['duration_s']:.2f} s, client "
                    f"{100 * r['client_cpu_s'] / r['duration_s']:.0f}% of a core, time to first chunk "
                    f"p50 {r['ttft_ms']['p50']:.0f} ms"
                )
    finally:
        server.terminate()
        server.wait(10)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
