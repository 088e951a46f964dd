"""KV connectors end to end on the cpu plugin and a tiny random llama: greedy tokens are the
same with and without each connector, loads really replace compute (counted exactly), and
broken storage (a truncated file, an unwritable or full directory) costs recompute, never
tokens."""

from __future__ import annotations

import contextlib
import errno
import os
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest
import torch

from hallm.core.engine_args import EngineArgs
from hallm.core.sampling_params import SamplingParams
from hallm.entrypoints.llm import LLM
from hallm.platforms import ConfigError

BLOCK_SIZE = 4
OUTPUT_LEN = 6
# Two prompts sharing a 13-token prefix, one unrelated: lengths 21, 18, 11.
SHARED = list(range(40, 53))
PROMPTS = [SHARED + list(range(200, 208)), SHARED + list(range(300, 305)), list(range(400, 411))]
OFFLOAD = {"kv_connector": "offload", "kv_connector_extra_config": {"cpu_bytes": 1 << 24}}


@pytest.fixture(scope="module")
def model_dir(tiny_model_dir: Callable[[str], Path]) -> str:
    return str(tiny_model_dir("llama"))


def make_llm(
    model_dir: str,
    kv: dict[str, Any] | None = None,
    num_blocks: int = 256,
    max_num_batched_tokens: int = 64,
    **kwargs: Any,
) -> LLM:
    return LLM(
        model=model_dir,
        device="cpu",
        dtype="float32",
        block_size=BLOCK_SIZE,
        num_gpu_blocks_override=num_blocks,
        max_num_batched_tokens=max_num_batched_tokens,
        kv_transfer_config=kv,
        **kwargs,
    )


def storage(path: Path, role: str = "kv_both", **extra: Any) -> dict[str, Any]:
    return {
        "kv_connector": "shared_storage",
        "kv_role": role,
        "kv_connector_extra_config": {"shared_storage_path": str(path), **extra},
    }


def greedy(max_tokens: int = OUTPUT_LEN) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)


def generate(llm: LLM, prompts: list[list[int]], max_tokens: int = OUTPUT_LEN) -> list[list[int]]:
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], greedy(max_tokens), use_tqdm=False)
    return [list(o.outputs[0].token_ids) for o in outs]


def loadable_tokens(prompt: list[int]) -> int:
    """Full blocks of the prompt short of its last token (which is always computed)."""
    return (len(prompt) - 1) // BLOCK_SIZE * BLOCK_SIZE


@pytest.fixture(scope="module")
def expected(model_dir: str) -> list[list[int]]:
    """The oracle: one engine, no connector."""
    return generate(make_llm(model_dir), PROMPTS)


def kv_stats(llm: LLM) -> dict[str, Any]:
    return {k: v for k, v in llm.engine.get_stats().items() if k.startswith("kv_connector_")}


def test_shared_storage_prefill_on_one_engine_decode_on_another(
    model_dir: str, expected: list[list[int]], tmp_path: Path
) -> None:
    check_prefill_then_decode(model_dir, expected, tmp_path)


def check_prefill_then_decode(
    model_dir: str, expected: list[list[int]], path: Path, ranks: int = 1, **engine: Any
) -> None:
    """Prefill PROMPTS on a kv_producer engine, decode them on a kv_consumer engine (both of
    `ranks` tensor-parallel ranks, with `engine`'s other settings): the consumer loads every
    loadable block, computes none of them again, and gives the oracle's tokens."""
    with engine_of(
        make_llm(model_dir, storage(path, "kv_producer"), tensor_parallel_size=ranks, **engine)
    ) as producer:
        first = generate(producer, PROMPTS, max_tokens=1)
        assert kv_stats(producer).get("kv_connector_tokens_loaded", 0) == 0
    assert [t[:1] for t in expected] == first
    saved = {p.name for p in path.rglob("*.kvb")}
    # Full prompt blocks 5 + 4 + 2, of which the shared prefix's 3 are saved once; a file per rank.
    assert len(saved) == (5 + 1 + 2) * ranks

    consumer = make_llm(
        model_dir,
        storage(path, "kv_consumer"),
        enable_prefix_caching=False,
        tensor_parallel_size=ranks,
        **engine,
    )
    with engine_of(consumer):
        outs = consumer.generate([{"prompt_token_ids": p} for p in PROMPTS], greedy(), use_tqdm=False)
        assert [list(o.outputs[0].token_ids) for o in outs] == expected
        loaded = sum(loadable_tokens(p) for p in PROMPTS)
        stats = kv_stats(consumer)
        assert stats["kv_connector_tokens_loaded"] == loaded
        assert stats.get("kv_connector_load_failures", 0) == 0
        check_metrics(consumer, "shared_storage", loaded)
        assert [o.num_cached_tokens for o in outs] == [loadable_tokens(p) for p in PROMPTS]
    assert {p.name for p in path.rglob("*.kvb")} == saved  # a consumer saves nothing


@contextlib.contextmanager
def engine_of(llm: LLM) -> Iterator[LLM]:
    """`llm`, shut down on the way out (a tensor-parallel engine's worker processes end)."""
    try:
        yield llm
    finally:
        llm.engine.shutdown()


def test_shared_storage_both_roles_with_prefix_caching(
    model_dir: str, expected: list[list[int]], tmp_path: Path
) -> None:
    """kv_both: the first pass saves, the second (after the local prefix cache is reset) loads;
    loaded blocks become prefix-cache blocks of the engine."""
    llm = make_llm(model_dir, storage(tmp_path))
    assert generate(llm, PROMPTS) == expected
    llm.engine.reset_prefix_cache()
    assert generate(llm, PROMPTS) == expected
    stats = kv_stats(llm)
    assert stats["kv_connector_tokens_loaded"] > 0
    # The shared prefix came from storage once, then from the local prefix cache.
    again = llm.generate([{"prompt_token_ids": [*SHARED, 7, 8, 9]}], greedy(), use_tqdm=False)[0]
    assert again.num_cached_tokens == 12
    assert kv_stats(llm)["kv_connector_tokens_loaded"] == stats["kv_connector_tokens_loaded"]
    # Shutting the engine down ends the worker side's file readers too (not only once the
    # connector is garbage: it is still referenced here).
    worker_side = llm.engine.executor.worker.runner.kv_connector
    readers = [t for t in threading.enumerate() if t.name.startswith("hallm-kv-read")]
    assert worker_side is not None and readers, "the loads ran on the reader pool"
    llm.engine.shutdown()
    for t in readers:
        t.join(timeout=5)
    assert not any(t.is_alive() for t in readers)


def test_truncated_file_is_ignored_and_recomputed(
    model_dir: str, expected: list[list[int]], tmp_path: Path
) -> None:
    generate(make_llm(model_dir, storage(tmp_path, "kv_producer")), PROMPTS, max_tokens=1)
    files = sorted(tmp_path.rglob("*.kvb"))
    for f in files[:3]:
        data = f.read_bytes()
        f.write_bytes(data[: len(data) // 2])
    files[3].write_bytes(files[3].read_bytes()[:-1] + b"\x00")  # same length, wrong checksum
    consumer = make_llm(model_dir, storage(tmp_path, "kv_consumer"))
    assert generate(consumer, PROMPTS) == expected
    stats = kv_stats(consumer)
    assert stats["kv_connector_corrupt_blocks"] >= 1
    assert stats["kv_connector_load_failures"] >= 1


def test_wrong_kv_with_a_valid_checksum_changes_the_tokens(
    model_dir: str, expected: list[list[int]], tmp_path: Path
) -> None:
    """The control: KV that loads without complaint but is wrong (scaled by 3, checksum redone)
    changes the greedy tokens, so the tests above that compare tokens would see a bad load."""
    import xxhash

    from hallm.core.kv_connectors.blocks import HEADER as _HEADER
    from hallm.core.kv_connectors.blocks import MAGIC

    generate(make_llm(model_dir, storage(tmp_path, "kv_producer")), PROMPTS, max_tokens=1)
    for f in tmp_path.rglob("*.kvb"):
        blob = f.read_bytes()
        _, size, _, desc_len = _HEADER.unpack_from(blob)
        desc = blob[_HEADER.size : _HEADER.size + desc_len]
        values = torch.frombuffer(bytearray(blob[_HEADER.size + desc_len :]), dtype=torch.float32) * 3
        payload = values.numpy().tobytes()
        f.write_bytes(_HEADER.pack(MAGIC, size, xxhash.xxh3_64_intdigest(payload), desc_len) + desc + payload)
    consumer = make_llm(model_dir, storage(tmp_path, "kv_consumer"))
    assert generate(consumer, PROMPTS) != expected
    assert kv_stats(consumer).get("kv_connector_load_failures", 0) == 0


def test_unwritable_directory_costs_the_save_not_the_request(
    model_dir: str, expected: list[list[int]], tmp_path: Path
) -> None:
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file where the storage directory should be")
    llm = make_llm(model_dir, storage(blocker / "kv"))
    assert generate(llm, PROMPTS) == expected
    stats = kv_stats(llm)
    assert stats["kv_connector_save_failures"] > 0
    assert stats.get("kv_connector_tokens_saved", 0) == 0


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes to read-only directories")
def test_read_only_directory(model_dir: str, expected: list[list[int]], tmp_path: Path) -> None:
    llm = make_llm(model_dir, storage(tmp_path))
    identity_dir = tmp_path / next(iter(os.listdir(tmp_path)), "") if os.listdir(tmp_path) else tmp_path
    os.chmod(identity_dir, 0o555)
    try:
        assert generate(llm, PROMPTS) == expected
        assert kv_stats(llm)["kv_connector_save_failures"] > 0
    finally:
        os.chmod(identity_dir, 0o755)


def test_full_disk(
    model_dir: str, expected: list[list[int]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from hallm.core.kv_connectors import shared_storage

    def no_space(*args: Any, **kwargs: Any) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    llm = make_llm(model_dir, storage(tmp_path))
    monkeypatch.setattr(shared_storage.os, "replace", no_space)
    assert generate(llm, PROMPTS) == expected
    assert kv_stats(llm)["kv_connector_save_failures"] > 0
    assert not list(tmp_path.rglob("*.tmp")) and not list(tmp_path.rglob("*.kvb"))


def test_storage_is_bounded(model_dir: str, tmp_path: Path) -> None:
    llm = make_llm(model_dir, storage(tmp_path))
    generate(llm, PROMPTS[:1], max_tokens=1)
    one_block = next(tmp_path.rglob("*.kvb")).stat().st_size
    llm = make_llm(model_dir, storage(tmp_path, max_storage_bytes=3 * one_block))
    generate(llm, PROMPTS, max_tokens=1)
    assert len(list(tmp_path.rglob("*.kvb"))) <= 3
    assert kv_stats(llm)["kv_connector_evicted_blocks"] > 0


def test_offload_round_trip(model_dir: str, expected: list[list[int]]) -> None:
    check_offload_round_trip(make_llm(model_dir, OFFLOAD, num_blocks=9), expected)


def check_offload_round_trip(llm: LLM, expected: list[list[int]]) -> None:
    """A device pool too small to keep the prefixes: the second pass finds every loadable block
    either in the device's prefix cache or in host memory (nothing recomputed), loads some from
    the host, and produces the same tokens."""
    for p, want in zip(PROMPTS, expected, strict=True):
        assert generate(llm, [p]) == [want]
    assert kv_stats(llm).get("kv_connector_tokens_loaded", 0) == 0
    assert llm.engine.get_stats()["prefix_cache_evictions"] > 0
    for p, want in zip(PROMPTS, expected, strict=True):
        out = llm.generate([{"prompt_token_ids": p}], greedy(), use_tqdm=False)[0]
        assert list(out.outputs[0].token_ids) == want
        assert out.num_cached_tokens == loadable_tokens(p)
    stats = kv_stats(llm)
    assert stats["kv_connector_offload_hit_tokens"] == stats["kv_connector_tokens_loaded"] > 0
    assert stats.get("kv_connector_load_failures", 0) == 0
    check_metrics(llm, "offload", stats["kv_connector_tokens_loaded"])


def check_metrics(llm: LLM, connector: str, tokens_loaded: int) -> None:
    """The counters reach the server's /metrics through the engine process's stats message."""
    from hallm.core.engine_process import engine_stats
    from hallm.core.engine_protocol import EngineStats, make_encoder
    from hallm.entrypoints.openai.metrics import ServerMetrics

    sent = engine_stats(llm.engine)
    received = msgspec.msgpack.decode(make_encoder().encode(sent), type=EngineStats)
    assert received.kv_connector == connector
    assert received.kv_connector_counters["tokens_loaded"] == tokens_loaded
    metrics = ServerMetrics("tiny")
    metrics.engine_stats(received)
    text = metrics.render().decode()
    assert (
        f'hallm:kv_connector_tokens_loaded{{connector="{connector}",model_name="tiny"}} {float(tokens_loaded)}'
        in text
    )


def test_offload_evicts_least_recently_used(model_dir: str, expected: list[list[int]]) -> None:
    llm = make_llm(model_dir, {"kv_connector": "offload"}, num_blocks=9)
    per_block = llm.engine.config.cache.bytes_per_block
    llm = make_llm(
        model_dir,
        {"kv_connector": "offload", "kv_connector_extra_config": {"cpu_bytes": 4 * per_block}},
        num_blocks=9,
    )
    for _ in range(2):
        for p, want in zip(PROMPTS, expected, strict=True):
            assert generate(llm, [p]) == [want]
    assert kv_stats(llm)["kv_connector_offload_evicted_blocks"] > 0


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"kv_connector": "nope"}, "unknown KV connector 'nope'"),
        ({"kv_connector": "offload", "kv_role": "both"}, "kv_role"),
        ({"kv_connector": "shared_storage"}, "shared_storage_path"),
        ('{"kv_connector": ', "not valid JSON"),
        ({"kv_connector": "offload", "kv_connector_extra_config": {"cpu_bytes": -1}}, "cpu_bytes"),
        ({"kv_conector": "offload"}, "unknown keys"),
    ],
)
def test_bad_config_is_a_clear_error(model_dir: str, config: Any, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        make_llm(model_dir, config)


def test_cli_flag(model_dir: str) -> None:
    import argparse

    from hallm.entrypoints.cli.engine_args import add_engine_args, engine_args_from

    parser = argparse.ArgumentParser()
    add_engine_args(parser)
    args = parser.parse_args(
        [model_dir, "--kv-transfer-config", '{"kv_connector": "offload", "kv_role": "kv_both"}']
    )
    engine_args = engine_args_from(args)
    assert isinstance(engine_args, EngineArgs)
    config = engine_args.create_engine_config()
    assert config.kv_transfer is not None and config.kv_transfer.kv_connector == "offload"


def test_connectors_under_preemption_and_chunked_prefill(model_dir: str, tmp_path: Path) -> None:
    """Many requests at once over shared prefixes, a pool small enough to preempt, 8-token
    chunks: the same tokens as the plain engine with either connector, loads included."""
    import random

    rng = random.Random(0)
    systems = [[rng.randrange(3, 500) for _ in range(rng.randint(9, 19))] for _ in range(3)]
    prompts = [systems[i % 3] + [rng.randrange(3, 500) for _ in range(rng.randint(1, 6))] for i in range(10)]
    small = {"num_blocks": 24, "max_num_batched_tokens": 8}
    want = generate(make_llm(model_dir, None, **small), prompts)
    offload = {"kv_connector": "offload", "kv_connector_extra_config": {"cpu_bytes": 1 << 24}}
    for kv in (offload, storage(tmp_path)):
        llm = make_llm(model_dir, kv, **small)
        assert generate(llm, prompts) == want
        llm.engine.reset_prefix_cache()
        assert generate(llm, prompts) == want
        assert llm.engine.get_stats()["num_preemptions"] > 0
        assert kv_stats(llm)["kv_connector_tokens_loaded"] > 0


@pytest.mark.slow  # four engines of the real model: ~45 s on 2 shared cores
def test_smollm2_disaggregated_and_offloaded(smollm2_dir: Path, tmp_path: Path) -> None:
    """The golden model: a chat prompt prefilled on one engine and decoded on another through
    shared storage, and reloaded from host memory after a prefix-cache reset, gives the same
    greedy text as one plain engine."""

    def engine(kv: dict[str, Any] | None) -> LLM:
        return LLM(
            model=str(smollm2_dir), device="cpu", dtype="float32", max_model_len=256, kv_transfer_config=kv
        )

    plain = engine(None)
    tokenizer = plain.get_tokenizer()
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Name three rivers in Europe and one fact about each."}],
        add_generation_prompt=True,
        tokenize=False,
    )
    prompt = list(tokenizer.encode(text, add_special_tokens=False))
    params = SamplingParams(temperature=0.0, max_tokens=12)
    want = plain.generate([{"prompt_token_ids": prompt}], params, use_tqdm=False)[0].outputs[0].text
    del plain
    generate(engine(storage(tmp_path, "kv_producer")), [prompt], max_tokens=1)
    consumer = engine(storage(tmp_path, "kv_consumer"))
    got = consumer.generate([{"prompt_token_ids": prompt}], params, use_tqdm=False)[0].outputs[0].text
    assert got == want
    assert kv_stats(consumer)["kv_connector_tokens_loaded"] == (len(prompt) - 1) // 16 * 16 > 0
    del consumer
    offload = engine({"kv_connector": "offload", "kv_connector_extra_config": {"cpu_bytes": 1 << 27}})
    for _ in range(2):
        out = offload.generate([{"prompt_token_ids": prompt}], params, use_tqdm=False)[0]
        assert out.outputs[0].text == want
        offload.engine.reset_prefix_cache()
    assert kv_stats(offload)["kv_connector_tokens_loaded"] == (len(prompt) - 1) // 16 * 16
