"""`make demo` (`python -m hallm.entrypoints.demo`): the OpenAI-compatible server end to end.

Starts `hallm serve` on the default model (SmolLM2-135M-Instruct) with the CPU plugin on a free
loopback port (with a random API key), asks one chat question with the official `openai`
client, prints the answer, and stops the server with SIGTERM (which must exit 0).

The server gets a 2048-token context and 512-token steps: the engine sizes its KV cache after a
worst-case step of --max-num-batched-tokens, which with the defaults (8192) takes minutes on a
small CPU. Everything else is `hallm serve`'s default.
"""

from __future__ import annotations

import argparse
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Sequence

QUESTION = "What is the capital of France? Answer in one sentence."


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_healthy(proc: subprocess.Popen[bytes], url: str, timeout: float) -> None:
    """Poll /health until 200; fail early if the server process exits."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(
                f"the server exited with code {proc.returncode} before it was ready (see above)"
            )
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as resp:
                if resp.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.25)
    raise RuntimeError(f"the server was not ready after {timeout:.0f} s")


def stop(proc: subprocess.Popen[bytes], timeout: float = 60.0) -> int:
    """SIGTERM, wait; kill if it does not exit in time. Returns the exit code."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)
        raise RuntimeError(f"the server did not exit within {timeout:.0f} s of SIGTERM; killed it") from None


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cpu", help="device plugin id (default: cpu)")
    parser.add_argument("--question", default=QUESTION)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--startup-timeout", type=float, default=600.0)
    args = parser.parse_args(argv)

    import openai

    port = free_port()
    api_key = secrets.token_urlsafe(16)
    url = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "hallm.entrypoints.cli", "serve", "--device", args.device]
    cmd += ["--max-model-len", "2048", "--max-num-batched-tokens", "512"]
    cmd += ["--host", "127.0.0.1", "--port", str(port), "--disable-uvicorn-access-log"]
    env = {**os.environ, "HALLM_API_KEY": api_key, "HF_HUB_OFFLINE": "1"}
    print(f"$ {' '.join(cmd[2:])}  (API key in $HALLM_API_KEY)", flush=True)
    proc = subprocess.Popen(cmd, env=env)
    try:
        wait_healthy(proc, url, args.startup_timeout)
        client = openai.OpenAI(base_url=f"{url}/v1", api_key=api_key, max_retries=0, timeout=300)
        model = client.models.list().data[0].id
        print(f"\nmodel: {model}\nuser: {args.question}", flush=True)
        start = time.perf_counter()
        reply = client.chat.completions.create(
            model=model,
            messages=[{"role": "user", "content": args.question}],
            max_tokens=args.max_tokens,
            temperature=0.0,
        )
        elapsed = time.perf_counter() - start
        print(f"assistant: {(reply.choices[0].message.content or '').strip()}")
        if reply.usage is not None:
            u = reply.usage
            print(
                f"({u.prompt_tokens} prompt + {u.completion_tokens} completion tokens in {elapsed:.2f} s, "
                f"finish_reason={reply.choices[0].finish_reason})\n",
                flush=True,
            )
    except BaseException:
        stop(proc)
        raise
    code = stop(proc)
    print(f"server stopped (exit code {code})")
    return 0 if code == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
