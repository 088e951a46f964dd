"""KV connectors with tensor parallelism (2 ranks on the cpu plugin, gloo): every rank moves its
own shard of the KV heads, and the engine counts a load only where every rank loaded it.

The oracle is the single-rank engine without a connector (TP=2 gives its greedy tokens exactly:
test_tensor_parallel.py). Each worker runs torch on one thread (test_tensor_parallel's fixture).
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from hallm.core.kv_cache.hashing import extend_block_hashes
from tests.engine.test_kv_connector_p2p import check_p2p_push
from tests.engine.test_kv_connectors import (
    BLOCK_SIZE,
    OFFLOAD,
    PROMPTS,
    check_offload_round_trip,
    check_prefill_then_decode,
    engine_of,
    generate,
    kv_stats,
    loadable_tokens,
    make_llm,
    storage,
)
from tests.engine.test_tensor_parallel import _one_thread_per_worker, local_ray  # noqa: F401

TP2 = {"tensor_parallel_size": 2}


@pytest.fixture(scope="module")
def model_dir(tiny_model_dir: Callable[[str], Path]) -> str:
    return str(tiny_model_dir("llama"))


@pytest.fixture(scope="module")
def expected(model_dir: str) -> list[list[int]]:
    """The oracle: one single-rank engine, no connector."""
    return generate(make_llm(model_dir), PROMPTS)


@pytest.fixture(scope="module")
def tp2_saved(model_dir: str, expected: list[list[int]], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """What a synchronous-mp TP=2 kv_producer saved of PROMPTS (each test works on a copy)."""
    path = tmp_path_factory.mktemp("tp2-producer")
    with engine_of(make_llm(model_dir, storage(path, "kv_producer"), **TP2)) as producer:
        assert generate(producer, PROMPTS, max_tokens=1) == [t[:1] for t in expected]
    return path


def copy_of(saved: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(saved, tmp_path / "kv"))


def block_file(root: Path, prompt: list[int], index: int, rank: int) -> Path:
    """The file of `rank`'s shard of the prompt's block `index`, as a TP=2 instance names it."""
    hashes: list[bytes] = []
    extend_block_hashes(hashes, prompt, BLOCK_SIZE)
    (found,) = root.rglob(f"{hashes[index].hex()}.tp2-{rank}.kvb")
    return found


# Synchronous mp (the default) runs the same producer/consumer round in tp2_saved and
# test_one_ranks_shard_broken_or_missing.
@pytest.mark.parametrize(
    "engine",
    [
        pytest.param({"async_scheduling": True}, id="mp-async"),
        pytest.param({"distributed_executor_backend": "ray"}, id="ray"),
    ],
)
def test_shared_storage_prefill_then_decode(
    model_dir: str, expected: list[list[int]], tmp_path: Path, engine: dict[str, Any], request: Any
) -> None:
    if engine.get("distributed_executor_backend") == "ray":
        request.getfixturevalue("local_ray")
    check_prefill_then_decode(model_dir, expected, tmp_path, ranks=2, **engine)
    assert len(list(tmp_path.rglob("*.tp2-1.kvb"))) == 5 + 1 + 2


def test_offload_round_trip_with_eviction(model_dir: str, expected: list[list[int]]) -> None:
    """The byte budget is the instance's: each rank's host pool holds its shard of every slot."""
    with engine_of(make_llm(model_dir, OFFLOAD, num_blocks=9, async_scheduling=True, **TP2)) as llm:
        check_offload_round_trip(llm, expected)


def test_p2p_prefill_pushes_to_decode(model_dir: str, expected: list[list[int]]) -> None:
    check_p2p_push(model_dir, expected, ranks=2)


def test_one_ranks_shard_broken_or_missing(
    model_dir: str, expected: list[list[int]], tp2_saved: Path, tmp_path: Path
) -> None:
    """Rank 1's shard of PROMPTS[2]'s first block truncated: rank 0 loads its shard, rank 1 fails,
    and the request recomputes on both ranks (counted as a load failure). Rank 1's shard of
    PROMPTS[0]'s last loadable block deleted: that block is not offered (rank 0's shard alone
    is no use), the blocks before it are."""
    path = copy_of(tp2_saved, tmp_path)
    broken = block_file(path, PROMPTS[2], 0, rank=1)
    broken.write_bytes(broken.read_bytes()[:100])
    block_file(path, PROMPTS[0], 4, rank=1).unlink()
    consumer = make_llm(model_dir, storage(path, "kv_consumer"), enable_prefix_caching=False, **TP2)
    with engine_of(consumer):
        assert generate(consumer, PROMPTS) == expected
        stats = kv_stats(consumer)
    assert stats["kv_connector_load_failures"] == 1
    assert stats["kv_connector_corrupt_blocks"] == 1
    want = loadable_tokens(PROMPTS[0]) - BLOCK_SIZE + loadable_tokens(PROMPTS[1])
    assert stats["kv_connector_tokens_loaded"] == want


def test_one_rank_instance_ignores_a_split_instances_files(
    model_dir: str, expected: list[list[int]], tp2_saved: Path, tmp_path: Path
) -> None:
    """A TP=1 instance looks for other file names than a TP=2 one: it loads nothing of the
    TP=2 shards (and neither reads them as corrupt nor deletes them), then saves its own."""
    path = copy_of(tp2_saved, tmp_path)
    shards = sorted(path.rglob("*.kvb"))
    assert len(shards) == (5 + 1 + 2) * 2
    llm = make_llm(model_dir, storage(path))
    assert generate(llm, PROMPTS) == expected
    stats = kv_stats(llm)
    assert stats.get("kv_connector_tokens_loaded", 0) == 0
    assert stats.get("kv_connector_corrupt_blocks", 0) == 0
    assert all(p.is_file() for p in shards)
    assert len(list(path.rglob("*.kvb"))) == len(shards) + 5 + 1 + 2
