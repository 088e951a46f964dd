"""The default step budget (`max_num_batched_tokens` when the user sets none) comes from the
platform: the core's rule follows max_model_len within [2048, 8192]; the CUDA plugin asks for
8192 whatever the context length; a value the user sets always wins."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from hallm.core.engine_args import EngineArgs


@pytest.fixture(scope="module")
def model_dir(tiny_model_dir: Callable[[str], Path]) -> str:
    return str(tiny_model_dir("llama"))


def budget(model_dir: str, **kwargs: Any) -> int:
    args = EngineArgs(model=model_dir, device="cpu", dtype="float32", **kwargs)
    return args.create_engine_config().scheduler.max_num_batched_tokens


def test_core_default_follows_the_context_length(model_dir: str) -> None:
    from hallm_cpu.platform import CpuPlatform

    rule = CpuPlatform().default_max_num_batched_tokens  # the core's rule: the CPU keeps it
    assert [rule(n) for n in (64, 4096, 32768)] == [2048, 4096, 8192]
    assert budget(model_dir, max_model_len=64) == 2048


def test_platform_default_and_the_user_value(model_dir: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from hallm_cpu.platform import CpuPlatform

    asked: list[int] = []

    def platform_default(self: Any, max_model_len: int) -> int:
        asked.append(max_model_len)
        return 3000

    monkeypatch.setattr(CpuPlatform, "default_max_num_batched_tokens", platform_default)
    assert budget(model_dir, max_model_len=64) == 3000 and asked == [64]
    assert budget(model_dir, max_model_len=64, max_num_batched_tokens=128) == 128


def test_cuda_plugin_asks_for_8192_tokens_a_step() -> None:
    from hallm_cuda.platform import CudaPlatform

    platform = CudaPlatform()  # no device touched: the budget depends on no probe
    assert [platform.default_max_num_batched_tokens(n) for n in (1152, 8192, 131072)] == [8192] * 3
