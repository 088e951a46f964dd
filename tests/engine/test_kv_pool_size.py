"""The KV pool's size: the CPU's fixed default cap, `kv_cache_memory_bytes`, the ceiling of what
max_num_seqs x max_model_len can use, and the log line that says which one decided it."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from hallm.entrypoints.llm import LLM


@pytest.fixture(scope="module")
def model_dir(tiny_model_dir: Callable[[str], Path]) -> str:
    return str(tiny_model_dir("llama"))


def pool(model_dir: str, caplog: pytest.LogCaptureFixture, **kwargs: Any) -> tuple[int, int, str]:
    """(blocks, bytes per block, the log line) of an engine built with `kwargs`."""
    kwargs = {"block_size": 4, "max_model_len": 64, **kwargs}
    with caplog.at_level(logging.INFO, logger="hallm.engine"):
        llm = LLM(model=model_dir, device="cpu", dtype="float32", **kwargs)
    engine = llm.engine
    line = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("KV cache:"))
    caplog.clear()
    return engine.config.cache.num_blocks, engine.executor.kv_cache_bytes_per_block(), line


def test_cpu_default_cap_is_4_gib() -> None:
    from hallm_cpu.platform import CpuPlatform

    assert CpuPlatform().default_kv_cache_bytes() == 4 * 2**30


def test_cpu_default_cap_sizes_the_pool(
    model_dir: str, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    import hallm_cpu.platform

    # A cap small enough for the tiny model to reach (4 GiB would take ~millions of its blocks).
    monkeypatch.setattr(hallm_cpu.platform, "DEFAULT_KV_CACHE_BYTES", 64 * 1024)
    blocks, per_block, line = pool(model_dir, caplog, max_num_seqs=256)
    assert blocks == 64 * 1024 // per_block
    assert "cpu default" in line and "--kv-cache-memory-bytes" in line


def test_kv_cache_memory_bytes_overrides_the_default(
    model_dir: str, caplog: pytest.LogCaptureFixture
) -> None:
    blocks, per_block, line = pool(model_dir, caplog, kv_cache_memory_bytes=40 * 1024, max_num_seqs=256)
    assert blocks == 40 * 1024 // per_block
    assert "--kv-cache-memory-bytes" in line and "default" not in line


def test_pool_stops_at_what_the_sequences_can_use(model_dir: str, caplog: pytest.LogCaptureFixture) -> None:
    # 2 sequences of at most 64 tokens in blocks of 4: 32 blocks (+1 spare), far below 4 GiB.
    blocks, _, line = pool(model_dir, caplog, max_num_seqs=2)
    assert blocks == 2 * 64 // 4 + 1
    assert "--max-num-seqs x --max-model-len" in line


def test_worst_case_step_runs_only_where_the_platform_measures_peaks(
    model_dir: str, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Host memory has no peak to measure, so the CPU sizes its pool without the profiling step
    (a full step of prompt tokens, paid at every start); a platform that measures peaks runs it and keeps
    the activation peak out of the KV budget."""
    from hallm_cpu.platform import CpuPlatform

    from hallm.core.model_runner import ModelRunner

    calls: list[int] = []
    profile_run = ModelRunner.profile_run

    def counted(self: ModelRunner) -> None:
        calls.append(1)
        profile_run(self)

    monkeypatch.setattr(ModelRunner, "profile_run", counted)
    pool(model_dir, caplog, max_num_seqs=2)
    assert calls == []

    monkeypatch.setattr(CpuPlatform, "peak_memory_bytes", lambda self: 3 * 2**30)
    monkeypatch.setattr(CpuPlatform, "allocated_memory_bytes", lambda self: 2**30)
    with caplog.at_level(logging.INFO, logger="hallm.worker"):
        LLM(model=model_dir, device="cpu", dtype="float32", block_size=4, max_model_len=64, max_num_seqs=2)
    assert calls == [1]
    memory = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("memory:"))
    assert "activation peak 2.00 GiB" in memory, memory
