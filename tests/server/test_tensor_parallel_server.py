"""`hallm serve --tensor-parallel-size 2` on the CPU plugin: the official openai client gets the
same greedy text as from a one-rank server; a worker killed mid-stream ends that stream with an
error (never a hang), and /health answers 503."""

from __future__ import annotations

import os
import re
import signal
from collections.abc import Callable

import httpx
import openai
import pytest

from tests.server.utils import MODEL_NAME, Server, wait_until

PROMPT = "The quick brown fox"


def _greedy_text(server: Server) -> str:
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key=server.api_key or "unused", max_retries=0)
    out = client.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=12, temperature=0)
    return out.choices[0].text


def _rank_pids(server: Server) -> list[int]:
    match = wait_until(lambda: re.search(r"ranks up \(pids \[([\d, ]+)\]", server.log()), timeout=10)
    return [int(p) for p in match.group(1).split(",")]


@pytest.mark.parametrize("executor", ["mp", "ray"])
def test_tp2_server_answers_then_reports_a_dead_worker(
    server_factory: Callable[..., Server], server: Server, monkeypatch: pytest.MonkeyPatch, executor: str
) -> None:
    if executor == "ray":
        pytest.importorskip("ray")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # one torch thread per rank process
    tp = server_factory("--tensor-parallel-size", "2", "--distributed-executor-backend", executor)
    assert _greedy_text(tp) == _greedy_text(server)

    client = openai.OpenAI(base_url=f"{tp.url}/v1", api_key="unused", max_retries=0, timeout=120)
    stream = client.chat.completions.create(
        model=MODEL_NAME,
        messages=[{"role": "user", "content": "Count to a thousand."}],
        max_tokens=200,
        stream=True,
        extra_body={"ignore_eos": True},
    )
    chunks = iter(stream)
    next(chunks)  # generation is under way
    pids = _rank_pids(tp)
    os.kill(pids[1], signal.SIGKILL)
    with pytest.raises(openai.APIError, match="rank 1"):
        for _ in chunks:
            pass
    resp = wait_until(lambda: (r := httpx.get(f"{tp.url}/health", timeout=10)).status_code == 503 and r, 30)
    assert resp.json()["error"]["code"] == "engine_dead"
    assert tp.terminate(timeout=60) == 0, tp.log()
    assert wait_until(lambda: not any(_alive(p) for p in pids), 30)  # no rank outlives the server


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"  # a zombie has exited
    except (ProcessLookupError, FileNotFoundError):
        return False
