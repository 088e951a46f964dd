"""Tensor parallelism on the CPU plugin (gloo): TP=2 generates exactly TP=1's greedy tokens.

The oracle is the single-device engine (itself checked against HF transformers in
test_llm_vs_hf.py); float32, so that the only difference, the order of the sums split across
ranks, stays far below any argmax margin. Each worker runs torch on one thread.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from hallm import LLM, SamplingParams
from hallm.platforms import ConfigError

PROMPTS = ["The quick brown fox", "Hello, world! How are", "def add(a, b):"]
GREEDY = SamplingParams(max_tokens=10, temperature=0)


@pytest.fixture(autouse=True, scope="module")
def _one_thread_per_worker() -> Iterator[None]:
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("OMP_NUM_THREADS", "1")  # read by torch in each worker process
        yield


@pytest.fixture(scope="module")
def model_dirs(
    tiny_model_dir: Callable[[str], Path], tmp_path_factory: pytest.TempPathFactory
) -> dict[str, Path]:
    from tests.utils.tiny_models import build_tiny_model

    one_kv = build_tiny_model("llama", tmp_path_factory.mktemp("tiny-llama-1kv"), num_key_value_heads=1)
    return {"llama": tiny_model_dir("llama"), "qwen2": tiny_model_dir("qwen2"), "llama-1kv": one_kv}


def _generate(model: str | Path, prompts: list[str] = PROMPTS, **kwargs: object) -> list[list[int]]:
    llm = LLM(str(model), device="cpu", dtype="float32", max_model_len=128, **kwargs)  # type: ignore[arg-type]
    try:
        outs = llm.generate(prompts, GREEDY, use_tqdm=False)
        return [list(o.outputs[0].token_ids) for o in outs]
    finally:
        llm.engine.shutdown()


def _worker_pids(llm: LLM) -> list[int]:
    return [p.pid for p in llm.engine.executor.procs]  # type: ignore[attr-defined]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie (exited, not yet reaped) counts as gone.
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"
    except FileNotFoundError:
        return False


@pytest.mark.parametrize("arch", ["llama", "qwen2", "llama-1kv"])
def test_tp2_mp_matches_tp1(model_dirs: dict[str, Path], arch: str) -> None:
    expected = _generate(model_dirs[arch])
    assert _generate(model_dirs[arch], tensor_parallel_size=2) == expected  # mp is the default


def test_default_model_same_text_split(smollm2_gguf: Path) -> None:
    """SmolLM2-135M has 9 query and 3 KV heads: it splits over 3 ranks (not 2)."""
    prompts = ["The capital of France is", "List three colors:"]
    one = _generate(smollm2_gguf, prompts)
    assert _generate(smollm2_gguf, prompts, tensor_parallel_size=3, distributed_executor_backend="mp") == one


def test_tp_refusals(model_dirs: dict[str, Path]) -> None:
    with pytest.raises(ConfigError, match="divide"):
        LLM(str(model_dirs["llama"]), device="cpu", tensor_parallel_size=3)
    with pytest.raises(ConfigError, match="mp"):
        LLM(
            str(model_dirs["llama"]), device="cpu", tensor_parallel_size=2, distributed_executor_backend="uni"
        )


def test_killed_worker_ends_the_engine_cleanly(model_dirs: dict[str, Path]) -> None:
    from hallm.core.executors.mp import WorkerDiedError

    llm = LLM(
        str(model_dirs["llama"]), device="cpu", dtype="float32", max_model_len=128, tensor_parallel_size=2
    )
    executor = llm.engine.executor
    pids = _worker_pids(llm)
    socket_dir = executor._dir  # type: ignore[attr-defined]
    try:
        llm.engine.add_request("0", "The quick brown fox", SamplingParams(max_tokens=50, temperature=0))
        llm.engine.step()  # the prompt's step: generation is under way
        os.kill(pids[1], signal.SIGKILL)
        start = time.monotonic()
        with pytest.raises(WorkerDiedError, match="rank 1"):
            while llm.engine.has_unfinished_requests():
                llm.engine.step()
        assert time.monotonic() - start < 60  # reported, not hung in rank 0's collective
        with pytest.raises(WorkerDiedError):
            executor.check_health()
    finally:
        llm.engine.shutdown()
    assert not any(_alive(p) for p in pids)
    assert socket_dir is not None and not Path(socket_dir).exists()
