"""The KV connector round trip (L2): save a prompt's KV through one pair of connector
instances, load it into another engine's cache through a fresh pair, compare the blocks.

The flow follows the contract's two roles (hallm.platforms.kv_connector): on the producer the
scheduler side learns the prompt's blocks and builds the step's metadata, the worker side
registers the caches and saves each layer; on the consumer a fresh scheduler side says how
many prompt tokens can be loaded, learns where they go, and the worker side loads them. The
connector gets the engine config of the tiny model; one that needs more configuration (a
storage path, a server address) reads it from its environment.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any, NoReturn

import numpy as np
import pytest
import torch

from hallm.conformance.e2e import ENGINE_SETTINGS
from hallm.conformance.kernels import torch_dtype
from hallm.ops.testing import layout_tensors
from hallm.platforms import BatchLayout, KVConnectorRole

if TYPE_CHECKING:
    from hallm.conformance.target import Target

#: The core connector the kit round-trips on every device (configured by the kit: a temporary
#: directory), beside the connectors the plugin contributes.
CORE_CONNECTOR = "shared_storage"
LAYERS = ("layers.0.attn", "layers.1.attn")
SRC_BLOCKS, DST_BLOCKS = [5, 2, 9, 7], [11, 3, 14, 6]
NUM_BLOCKS, NUM_KV_HEADS = 16, 2


def round_trip(
    target: Target,
    connector_cls: type,
    model_dir: str,
    dtype: str,
    head_size: int,
    block_size: int,
    kv_transfer_config: dict[str, Any] | None = None,
) -> None:
    """Save through one connector pair, load through another; fail naming the broken step.
    `kv_transfer_config` configures the engine (a core connector's storage path)."""
    from hallm.core.engine_args import EngineArgs
    from hallm.core.request import Request
    from hallm.core.sampling_params import SamplingParams

    name = getattr(connector_cls, "name", connector_cls.__name__)
    config = EngineArgs(
        model=model_dir,
        device=target.device_id,
        dtype=dtype,
        block_size=block_size,
        kv_transfer_config=kv_transfer_config,
        **ENGINE_SETTINGS,
    ).create_engine_config()
    device = target.platform().device(0)
    shape = (2, NUM_BLOCKS, block_size, NUM_KV_HEADS, head_size)
    gen = torch.Generator().manual_seed(0)
    src = {n: torch.randn(shape, generator=gen).to(device, torch_dtype(dtype)) for n in LAYERS}
    dst = {n: torch.full(shape, float("nan"), dtype=torch_dtype(dtype), device=device) for n in LAYERS}
    prompt = list(range(3, 3 + 3 * block_size + 5))
    request = Request(
        "kv-roundtrip", prompt, SamplingParams(max_tokens=1), frozenset(), config.model.max_model_len
    )

    def fail(what: str) -> NoReturn:
        pytest.fail(f"KV connector '{name}' of {target.origin}: {what}", pytrace=False)

    producer = connector_cls(config, KVConnectorRole.SCHEDULER)
    saver = connector_cls(config, KVConnectorRole.WORKER)
    producer.num_external_tokens(request, 0)
    producer.on_blocks_allocated(request, SRC_BLOCKS, 0)
    meta = producer.build_step_meta()
    saver.register_kv_caches(src)
    saver.start_load(meta)
    layout = _prefill_layout(len(prompt), block_size, device)
    for layer in LAYERS:
        saver.wait_layer_load(layer)
        saver.save_layer(layer, src[layer], layout)
    saver.wait_save()
    if producer.on_request_finished(request, SRC_BLOCKS):
        deadline = time.monotonic() + 30
        while request.request_id not in saver.finished()[0]:
            if time.monotonic() > deadline:
                fail("on_request_finished() asked to hold the blocks, but finished() never reported the send")
            time.sleep(0.01)

    consumer = connector_cls(config, KVConnectorRole.SCHEDULER)
    loader = connector_cls(config, KVConnectorRole.WORKER)
    n = consumer.num_external_tokens(request, 0)
    if not isinstance(n, int) or n < block_size:
        fail(
            f"a fresh scheduler side offers {n!r} loadable tokens for a saved {len(prompt)}-token prompt (>= one block expected)"
        )
    consumer.on_blocks_allocated(request, DST_BLOCKS, n)
    meta = consumer.build_step_meta()
    loader.register_kv_caches(dst)
    loader.start_load(meta)
    for layer in LAYERS:
        loader.wait_layer_load(layer)
    target.platform().synchronize()
    for layer in LAYERS:
        for p in range(n):
            s_blk, d_blk = SRC_BLOCKS[p // block_size], DST_BLOCKS[p // block_size]
            off = p % block_size
            if not torch.equal(src[layer][:, s_blk, off].cpu(), dst[layer][:, d_blk, off].cpu()):
                fail(
                    f"after the round trip, layer {layer} position {p} (block {d_blk} offset {off}) does not "
                    f"hold what was saved from block {s_blk} offset {off}"
                )


def _prefill_layout(num_tokens: int, block_size: int, device: torch.device) -> BatchLayout:
    table = np.zeros((1, len(SRC_BLOCKS) + 1), dtype=np.int32)
    table[0, : len(SRC_BLOCKS)] = SRC_BLOCKS
    slots = [SRC_BLOCKS[p // block_size] * block_size + p % block_size for p in range(num_tokens)]
    layout = BatchLayout(
        num_reqs=1,
        num_tokens=num_tokens,
        num_prefill_reqs=1,
        max_query_len=num_tokens,
        max_seq_len=num_tokens,
        query_start_loc=np.asarray([0, num_tokens], dtype=np.int32),
        seq_lens=np.asarray([num_tokens], dtype=np.int32),
        context_lens=np.zeros(1, dtype=np.int32),
        block_tables=table,
        slot_mapping=np.asarray(slots, dtype=np.int64),
        block_size=block_size,
    )
    layout.tensors = layout_tensors(layout, device)
    return layout
