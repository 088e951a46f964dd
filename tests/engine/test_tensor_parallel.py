"""Tensor parallelism on the CPU plugin (gloo): TP=2 generates exactly TP=1's greedy tokens.

The oracle is the single-device engine (itself checked against HF transformers in
test_llm_vs_hf.py); float32, so that the only difference, the order of the sums split across
ranks, stays far below any argmax margin. Each worker runs torch on one thread.
"""

from __future__ import annotations

import os
import signal
import sys
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


def _assert_gone_soon(pids: list[int], timeout: float = 30.0) -> None:
    """Every rank process exits within `timeout` seconds of the engine's shutdown."""
    deadline = time.monotonic() + timeout
    while any(_alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not any(_alive(p) for p in pids)


@pytest.fixture(scope="module")
def local_ray() -> Iterator[None]:
    """One local Ray instance (2 CPUs) for the module: the executor connects to it and, having
    not started it, leaves it running for the next test."""
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def tp1_tokens(model_dirs: dict[str, Path]) -> Callable[[str], list[list[int]]]:
    """The oracle's greedy tokens of PROMPTS for an arch of `model_dirs`, computed once."""
    cache: dict[str, list[list[int]]] = {}

    def get(arch: str) -> list[list[int]]:
        if arch not in cache:
            cache[arch] = _generate(model_dirs[arch])
        return cache[arch]

    return get


@pytest.mark.parametrize("arch", ["llama", "qwen2", "llama-1kv"])
def test_tp2_mp_matches_tp1(
    model_dirs: dict[str, Path], tp1_tokens: Callable[[str], list[list[int]]], arch: str
) -> None:
    assert _generate(model_dirs[arch], tensor_parallel_size=2) == tp1_tokens(arch)  # mp is the default


def test_ray_starts_and_stops_its_own_instance(model_dirs: dict[str, Path]) -> None:
    """Without a Ray instance the executor starts a local one (2 ranks of one CPU each) and
    stops it at shutdown."""
    ray = pytest.importorskip("ray")
    assert not ray.is_initialized()
    expected = _generate(model_dirs["llama"], PROMPTS[:1])
    got = _generate(
        model_dirs["llama"], PROMPTS[:1], tensor_parallel_size=2, distributed_executor_backend="ray"
    )
    assert got == expected
    assert not ray.is_initialized()


def test_tp2_ray_matches_tp1(
    model_dirs: dict[str, Path], tp1_tokens: Callable[[str], list[list[int]]], local_ray: None
) -> None:
    """The executor does not depend on the architecture: the sweep over them runs on mp."""
    got = _generate(model_dirs["llama"], tensor_parallel_size=2, distributed_executor_backend="ray")
    assert got == tp1_tokens("llama")


@pytest.mark.parametrize("arch", ["mixtral", "qwen2_moe", "qwen3_moe", "gpt_oss"])
def test_tp2_moe_matches_tp1(tiny_model_dir: Callable[[str], Path], arch: str) -> None:
    """Experts split by their intermediate dimension (Qwen2-MoE's shared expert too), the
    router on every rank; gpt-oss's sinks split with their query heads, its experts' down bias
    added once."""
    path = tiny_model_dir(arch)
    assert _generate(path, tensor_parallel_size=2) == _generate(path)


def test_olmoe_refuses_tp_from_the_config(tiny_model_dir: Callable[[str], Path]) -> None:
    with pytest.raises(
        ConfigError, match=r"OlmoeForCausalLM cannot be split .*normalizes q and k over all heads"
    ):
        LLM(str(tiny_model_dir("olmoe")), device="cpu", tensor_parallel_size=2)


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


def _kill_rank1_mid_generation(llm: LLM, pid: int) -> None:
    from hallm.core.executors.mp import WorkerDiedError

    llm.engine.add_request("0", "The quick brown fox", SamplingParams(max_tokens=50, temperature=0))
    llm.engine.step()  # the prompt's step: generation is under way
    os.kill(pid, signal.SIGKILL)
    start = time.monotonic()
    with pytest.raises(WorkerDiedError, match="rank 1"):
        while llm.engine.has_unfinished_requests():
            llm.engine.step()
    assert time.monotonic() - start < 60  # reported, not hung in rank 0's collective
    with pytest.raises(WorkerDiedError):
        llm.engine.executor.check_health()


def test_killed_ray_worker_ends_the_engine_cleanly(model_dirs: dict[str, Path], local_ray: None) -> None:
    llm = LLM(
        str(model_dirs["llama"]), device="cpu", dtype="float32", max_model_len=128, tensor_parallel_size=2,
        distributed_executor_backend="ray",
    )  # fmt: skip
    pids = list(llm.engine.executor.pids)  # type: ignore[attr-defined]
    try:
        _kill_rank1_mid_generation(llm, pids[1])
    finally:
        llm.engine.shutdown()
    _assert_gone_soon(pids)


def test_killed_worker_ends_the_engine_cleanly(model_dirs: dict[str, Path]) -> None:
    llm = LLM(
        str(model_dirs["llama"]), device="cpu", dtype="float32", max_model_len=128, tensor_parallel_size=2
    )
    executor = llm.engine.executor
    pids = _worker_pids(llm)
    socket_dir = executor._dir  # type: ignore[attr-defined]
    try:
        _kill_rank1_mid_generation(llm, pids[1])
    finally:
        llm.engine.shutdown()
    assert not any(_alive(p) for p in pids)
    assert socket_dir is not None and not Path(socket_dir).exists()


def test_ray_refusals(model_dirs: dict[str, Path], local_ray: None, monkeypatch: pytest.MonkeyPatch) -> None:
    """More ranks than the cluster can place, and Ray not installed: clear errors, nothing left."""
    from hallm.core.executors.ray import RayExecutor

    monkeypatch.setattr(RayExecutor, "placement_timeout_s", 2.0)
    with pytest.raises(
        ConfigError, match=r"cannot place 4 ranks of one 'CPU' each \(the cluster has 2 'CPU'"
    ):
        LLM(
            str(model_dirs["llama"]), device="cpu", tensor_parallel_size=4, distributed_executor_backend="ray"
        )
    import ray

    assert ray.available_resources().get("CPU") == 2  # the placement group was removed
    monkeypatch.setitem(sys.modules, "ray", None)
    with pytest.raises(ConfigError, match=r"pip install 'hallm\[ray\]'"):
        LLM(
            str(model_dirs["llama"]), device="cpu", tensor_parallel_size=2, distributed_executor_backend="ray"
        )
