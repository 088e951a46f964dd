"""L2 components: the platform's device runtime, each executor's lifecycle on a tiny model, and
the KV connectors the plugin contributes (round trip)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from hallm.conformance.connector_setups import core_setup, plugin_setup
from hallm.conformance.connectors import round_trip
from hallm.conformance.e2e import engine_shape, run_lifecycle
from hallm.conformance.target import Target

pytestmark = [pytest.mark.hallm_level(2)]


@pytest.mark.hallm_group("L2 platform runtime")
@pytest.mark.hallm_requires("available")
def test_platform_runtime(target: Target) -> None:
    """device(), set_device, manual_seed, synchronize, empty_cache, memory_info, device_name."""
    platform = target.platform()
    device = platform.device(0)
    if device.type != platform.device_type:
        pytest.fail(f"device(0) is {device}, but device_type is '{platform.device_type}'", pytrace=False)
    platform.set_device(0)
    platform.manual_seed(0)
    platform.synchronize()
    platform.empty_cache()
    free, total = platform.memory_info(0)
    if not (isinstance(free, int) and isinstance(total, int) and 0 < free <= total):
        pytest.fail(
            f"memory_info(0) returned ({free!r}, {total!r}); need ints with 0 < free <= total", pytrace=False
        )
    name = platform.device_name(0)
    if not isinstance(name, str) or not name.strip():
        pytest.fail(f"device_name(0) returned {name!r}", pytrace=False)


@pytest.mark.hallm_group("L2 executor lifecycle")
@pytest.mark.hallm_params("executor")
def test_executor_lifecycle(
    target: Target, tiny_model: Callable[[str, int], str], executor: str, dtype: str
) -> None:
    """start, available memory > 0, allocate the cache, execute steps until done, shutdown twice."""
    from hallm.core.executors import BUILTIN_EXECUTORS

    executors = {**BUILTIN_EXECUTORS, **target.contributions("hallm_executors")}
    head_size, block_size = engine_shape(target, dtype)
    run_lifecycle(target, executors[executor], tiny_model("llama", head_size), dtype, block_size)


@pytest.mark.hallm_group("L2 KV connector")
@pytest.mark.hallm_params("connector")
def test_kv_connector_round_trip(
    target: Target, tiny_model: Callable[[str, int], str], connector: str, tmp_path: Path
) -> None:
    """Blocks saved by one engine's connector load into another engine's cache bit for bit, the
    offered token counts are right, and a broken store reports a failed load, never wrong data
    (the plugin's connectors, and the core's shared_storage, offload and p2p on this device)."""
    dtype = target.capabilities().dtypes[0]
    head_size, block_size = engine_shape(target, dtype)
    if connector.startswith("core-"):
        setup = core_setup(connector.removeprefix("core-"), tmp_path, target.origin)
    else:
        setup = plugin_setup(connector, target.contributions("hallm_kv_connectors")[connector], target.origin)
    round_trip(target, setup, tiny_model("llama", head_size), dtype, head_size, block_size)
