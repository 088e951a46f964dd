"""Async scheduling across ranks (the mp executor, CPU plugin over gloo): the engine launches step
N+1 before it reads step N's sampled ids from rank 0, and the tokens, texts and finish reasons are
the single-device synchronous engine's, under chunked prefill, preemption and prefix caching,
with stop strings, stop tokens, EOS, penalties, seeded sampling and n > 1; an abort mid-generation
and a killed rank behave as with synchronous scheduling. One rank through mp takes the same path.
"""

from __future__ import annotations

import pickle
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from hallm import LLM, SamplingParams
from hallm.core.executors.mp import MultiprocExecutor
from hallm.core.outputs import RequestOutput
from tests.engine.test_async_scheduling import summary, workload
from tests.engine.test_tensor_parallel import (
    _alive,
    _assert_gone_soon,
    _kill_rank1_mid_generation,
    _worker_pids,
)


@pytest.fixture(autouse=True, scope="module")
def _one_thread_per_worker() -> Iterator[None]:
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("OMP_NUM_THREADS", "1")  # read by torch in each worker process
        yield


@pytest.fixture(scope="module")
def model_dir(tiny_model_dir: Callable[[str], Path]) -> str:
    return str(tiny_model_dir("llama"))


def make_llm(model_dir: str, async_scheduling: bool, **kwargs: Any) -> LLM:
    kwargs = {"block_size": 4, "num_gpu_blocks_override": 64, "max_model_len": 128, **kwargs}
    return LLM(model=model_dir, device="cpu", dtype="float32", async_scheduling=async_scheduling, **kwargs)


@pytest.mark.parametrize("ranks", [1, 2], ids=["mp-1-rank", "mp-2-ranks"])
def test_async_ranks_match_one_device_sync(model_dir: str, ranks: int) -> None:
    prompts, params = workload()
    # A small pool and step budget: chunked prefill and preemption; shared prefixes hit the cache.
    pressure = {"num_gpu_blocks_override": 28, "max_num_batched_tokens": 16, "max_num_seqs": 8}
    references = []
    for mode in (False, True):  # one device, sync and async: the same outputs
        reference = make_llm(model_dir, mode, **pressure)
        try:
            references.append(summary(reference.generate(prompts, params, use_tqdm=False)))
        finally:
            reference.engine.shutdown()
    expected = references[0]
    assert references[1] == expected
    llm = make_llm(model_dir, True, tensor_parallel_size=ranks, distributed_executor_backend="mp", **pressure)
    engine = llm.engine
    try:
        assert isinstance(engine.executor, MultiprocExecutor) and engine.async_scheduling
        pool = engine.scheduler.kv.pool
        start = pool.num_free_blocks
        sent: list[str] = []
        broadcast = engine.executor._broadcast_raw

        def counted(payload: bytes) -> None:
            sent.append(pickle.loads(payload)[0])
            broadcast(payload)

        engine.executor._broadcast_raw = counted  # type: ignore[method-assign]
        got = summary(llm.generate(prompts, params, use_tqdm=False))
        # Pipelined: a step's output comes with the next launch; a flush (a step answered on its
        # own) only where the engine drains its last step with nothing to launch after it.
        assert sent.count("flush") * 5 < sent.count("launch")
        assert engine.scheduler.num_preemptions > 0, "the pool should have forced preemption"
        assert engine.get_stats()["prefix_cache_hits"] > 0
        assert not engine.has_unfinished_requests()
        assert pool.num_free_blocks == start
        assert not engine.executor._waiting  # every launched step was answered or dropped
    finally:
        engine.shutdown()
    assert got == expected
    reasons = {c[2] for o in expected for c in o[:-1]}
    assert reasons == {"stop", "length"}


def test_async_tp2_abort_mid_generation(model_dir: str) -> None:
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    reference = make_llm(model_dir, False)
    try:
        (expected,) = reference.generate("Hello, world!", params, use_tqdm=False)
    finally:
        reference.engine.shutdown()
    engine = make_llm(model_dir, True, tensor_parallel_size=2, max_num_seqs=3).engine
    try:
        pool = engine.scheduler.kv.pool
        start = pool.num_free_blocks
        for rid in ("a", "b", "c", "d"):  # d waits: max_num_seqs=3
            engine.add_request(rid, "Hello, world!", params)
        engine.add_request("e", "The quick brown fox", SamplingParams(n=2, temperature=1.0, max_tokens=12))
        for _ in range(3):
            engine.step()
        assert engine._in_flight is not None  # a step is running on the ranks while we abort
        engine.abort_request(["b", "d", "e"])
        finished: dict[str, RequestOutput] = {}
        while engine.has_unfinished_requests():
            finished.update((o.request_id, o) for o in engine.step() if o.finished)
        assert set(finished) == {"a", "c"}
        for out in finished.values():
            assert out.outputs[0].token_ids == expected.outputs[0].token_ids
        assert pool.num_free_blocks == start
    finally:
        engine.shutdown()


def test_async_killed_worker_ends_the_engine_cleanly(model_dir: str) -> None:
    llm = make_llm(model_dir, True, tensor_parallel_size=2)
    assert llm.engine.async_scheduling
    pids = _worker_pids(llm)
    try:
        _kill_rank1_mid_generation(llm, pids[1])
    finally:
        llm.engine.shutdown()
    assert not any(_alive(p) for p in pids)


class _StepsToTheEndWorker:
    """A platform's own worker without `execute_async`."""

    def execute(self, step: Any) -> Any: ...


def test_mp_async_only_where_the_worker_can() -> None:
    from hallm_cpu.platform import CpuPlatform

    class OwnWorkerPlatform(CpuPlatform):
        def worker_class(self) -> type | None:
            return _StepsToTheEndWorker

    config = SimpleNamespace(parallel=SimpleNamespace(tensor_parallel_size=2))
    assert MultiprocExecutor(config, CpuPlatform()).supports_async is True
    assert MultiprocExecutor(config, OwnWorkerPlatform()).supports_async is False


@pytest.fixture(scope="module")
def local_ray() -> Iterator[None]:
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    yield
    ray.shutdown()


def test_async_tp2_ray_matches_one_device_sync(model_dir: str, local_ray: None) -> None:
    prompts, params = workload()
    prompts, params = prompts[:9], params[:9]
    pressure = {"num_gpu_blocks_override": 28, "max_num_batched_tokens": 16, "max_num_seqs": 8}
    reference = make_llm(model_dir, False, **pressure)
    try:
        expected = summary(reference.generate(prompts, params, use_tqdm=False))
    finally:
        reference.engine.shutdown()
    llm = make_llm(model_dir, True, tensor_parallel_size=2, distributed_executor_backend="ray", **pressure)
    try:
        assert llm.engine.async_scheduling
        got = summary(llm.generate(prompts, params, use_tqdm=False))
        assert llm.engine.scheduler.num_preemptions > 0, "the pool should have forced preemption"
    finally:
        llm.engine.shutdown()
    assert got == expected


def test_async_killed_ray_worker_ends_the_engine_cleanly(model_dir: str, local_ray: None) -> None:
    llm = make_llm(model_dir, True, tensor_parallel_size=2, distributed_executor_backend="ray")
    assert llm.engine.async_scheduling
    pids = list(llm.engine.executor.pids)  # type: ignore[attr-defined]
    try:
        _kill_rank1_mid_generation(llm, pids[1])
    finally:
        llm.engine.shutdown()
    _assert_gone_soon(pids)


class _LoggedStep:
    def __init__(self, log: list[str], i: int) -> None:
        self.log, self.i = log, i

    def get(self) -> str:
        self.log.append(f"resolve {self.i}")
        return f"out {self.i}"


class _LoggingWorker:
    def __init__(self) -> None:
        self.log: list[str] = []

    def execute_async(self, step: int) -> _LoggedStep:
        self.log.append(f"launch {step}")
        return _LoggedStep(self.log, step)


@pytest.mark.parametrize("rank", [0, 1])
def test_rank_launches_the_next_step_before_it_resolves_one(rank: int) -> None:
    from hallm.core.executors.rank_worker import RankWorker

    rw = RankWorker(None, rank, 2, rank, "")
    rw.worker = worker = _LoggingWorker()
    answers = [rw.launch(0, 0, False), rw.launch(1, 1, False), rw.flush(), rw.flush(), rw.launch(2, 2, True)]
    expected = [[], [(0, "out 0")], [(1, "out 1")], [], [(2, "out 2")]]
    assert answers == (expected if rank == 0 else [[]] * 5)  # only rank 0 answers
    assert worker.log == ["launch 0", "launch 1", "resolve 0", "resolve 1", "launch 2", "resolve 2"]
