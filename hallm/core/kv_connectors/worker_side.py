"""A worker's side of the KV connector: built once the real KV cache exists, then driven by the
model runner around each step's forward (loads started before it, waited for, saves and results
after it)."""

from __future__ import annotations

from typing import Any

import torch

from hallm.core.config import EngineConfig
from hallm.core.outputs import ModelRunnerOutput
from hallm.core.scheduler_output import SchedulerOutput
from hallm.platforms import KVConnector, KVConnectorRole, Platform


def start_worker_connector(
    config: EngineConfig, platform: Platform, kv_caches: dict[str, torch.Tensor]
) -> KVConnector | None:
    """The configured connector's worker side, handed this rank's KV cache by layer name; None
    without a connector."""
    from hallm.core.distributed.parallel_state import tp_rank
    from hallm.core.kv_connectors import create_connector

    connector = create_connector(config, KVConnectorRole.WORKER)
    if connector is None:
        return None
    connector.pin_host_memory = platform.capabilities().pinned_host_memory
    connector.tp_rank = tp_rank()
    connector.register_kv_caches(kv_caches)
    return connector


def finish_kv_step(
    connector: KVConnector,
    kv_caches: dict[str, torch.Tensor],
    step: SchedulerOutput,
    layout: Any,
    output: ModelRunnerOutput,
) -> None:
    """After the forward (`layout` None: the step computed nothing): wait for the loads, save
    every layer, report in `output` which loads arrived, which sends finished and the stats."""
    for name in kv_caches:
        connector.wait_layer_load(name)
    if layout is not None:
        for name, cache in kv_caches.items():
            connector.save_layer(name, cache, layout)
    connector.wait_save()
    failed = connector.failed_loads()
    output.kv_loaded = {r for r in step.kv_load_req_ids if r not in failed}
    output.kv_finished_sending = connector.finished()[0]
    output.kv_connector_stats = connector.take_stats()
