"""KV connectors on the GPU under async scheduling (the CUDA default), with decode CUDA graphs:
shared_storage prefill on one engine and decode on another, offload after the device pool
evicted the prefixes, p2p between two engines, loads beside decodes whose tokens are pending,
and truncated block files (tests/gpu/run_all.sh kv; skipped without a GPU).

The oracle is HF transformers by teacher forcing, with test_engine_gpu's float32 tie tolerance
(batches differ from a plain engine's, so bit-equal tokens are recorded, not required); the
loads are counted exactly. `hallm conformance --device cuda -- -k kv_connector` checks the
blocks themselves bit for bit on the device.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.gpu.test_engine_gpu import _assert_within, _check_against_hf, _free, _generate, _record

pytestmark = pytest.mark.skipif(
    torch.version.cuda is None or not torch.cuda.is_available(), reason="needs an NVIDIA GPU"
)

BLOCK = 16
MAX_TOKENS = 24


def _prompts() -> list[list[int]]:
    """Two shared prefixes (45 and 70 tokens) under 9 prompts, and 3 unrelated ones."""
    import random

    rng = random.Random(3)
    prefixes = [[rng.randrange(3, 512) for _ in range(n)] for n in (45, 70)]
    out = [prefixes[i % 2] + [rng.randrange(3, 512) for _ in range(rng.randint(3, 30))] for i in range(9)]
    return out + [[rng.randrange(3, 512) for _ in range(rng.randint(20, 90))] for _ in range(3)]


PROMPTS = _prompts()


def loadable(prompt: list[int]) -> int:
    return (len(prompt) - 1) // BLOCK * BLOCK


@pytest.fixture(scope="module")
def model(tiny_model_dir: Callable[[str], Path]) -> Iterator[tuple[str, Any, list[list[int]]]]:
    """(model dir, HF model on the GPU, the plain synchronous engine's tokens)."""
    from transformers import AutoModelForCausalLM

    path = tiny_model_dir("llama")
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).cuda().eval()
    plain = make_llm(str(path), None, async_scheduling=False)
    baseline = [t for t, _ in _generate(plain, PROMPTS, MAX_TOKENS)]
    _free(plain)
    yield str(path), hf, baseline


def make_llm(path: str, kv: dict[str, Any] | None, **kwargs: Any) -> Any:
    from hallm.entrypoints.llm import LLM

    kwargs.setdefault("gpu_memory_utilization", 0.3)
    llm = LLM(
        model=path,
        device="cuda",
        dtype="float32",
        max_model_len=256,
        block_size=BLOCK,
        max_num_batched_tokens=256,
        kv_transfer_config=kv,
        **kwargs,
    )
    if "async_scheduling" not in kwargs:
        assert llm.engine.async_scheduling, (
            "async scheduling is the CUDA default, with or without a connector"
        )
    return llm


def kv_stats(llm: Any) -> dict[str, Any]:
    return {k: v for k, v in llm.engine.get_stats().items() if k.startswith("kv_connector_")}


def check(
    name: str, model: tuple[str, Any, list[list[int]]], prompts: list[list[int]], outputs: list
) -> None:
    _, hf, baseline = model
    summary = _check_against_hf(hf, prompts, outputs)
    want = [baseline[PROMPTS.index(p)] for p in prompts]
    summary["same_as_plain_engine"] = sum(t == w for (t, _), w in zip(outputs, want, strict=True))
    summary["requests"] = len(prompts)
    _record(f"kv-{name}", summary)
    _assert_within(summary, tie_tol=1e-3, lp_tol=1e-3)


def storage(path: Path, role: str) -> dict[str, Any]:
    return {
        "kv_connector": "shared_storage",
        "kv_role": role,
        "kv_connector_extra_config": {"shared_storage_path": str(path)},
    }


def p2p(role: str, **extra: Any) -> dict[str, Any]:
    return {"kv_connector": "p2p", "kv_role": role, "kv_connector_extra_config": extra}


def test_shared_storage_disaggregated(model: tuple[str, Any, list[list[int]]], tmp_path: Path) -> None:
    producer = make_llm(model[0], storage(tmp_path, "kv_producer"))
    _generate(producer, PROMPTS, 1)
    _free(producer)
    consumer = make_llm(model[0], storage(tmp_path, "kv_consumer"), enable_prefix_caching=False)
    outputs = _generate(consumer, PROMPTS, MAX_TOKENS)
    stats = kv_stats(consumer)
    _free(consumer)
    assert stats["kv_connector_tokens_loaded"] == sum(loadable(p) for p in PROMPTS), stats
    assert stats.get("kv_connector_load_failures", 0) == 0, stats
    check("shared-storage", model, PROMPTS, outputs)


def test_offload_after_eviction(model: tuple[str, Any, list[list[int]]]) -> None:
    offload = {"kv_connector": "offload", "kv_connector_extra_config": {"cpu_bytes": 1 << 26}}
    llm = make_llm(model[0], offload, num_gpu_blocks_override=40)
    first = [o for p in PROMPTS for o in _generate(llm, [p], MAX_TOKENS)]
    assert llm.engine.get_stats()["prefix_cache_evictions"] > 0
    second = [o for p in PROMPTS for o in _generate(llm, [p], MAX_TOKENS)]
    stats = kv_stats(llm)
    _free(llm)
    assert stats["kv_connector_tokens_loaded"] > 0 and stats.get("kv_connector_load_failures", 0) == 0, stats
    check("offload", model, PROMPTS + PROMPTS, first + second)


def test_p2p(model: tuple[str, Any, list[list[int]]]) -> None:
    from tests.server.utils import free_port

    port = free_port()
    decode = make_llm(model[0], p2p("kv_consumer", kv_listen_port=port))
    prefill = make_llm(model[0], p2p("kv_producer", kv_peer=f"127.0.0.1:{port}"))
    try:
        _generate(prefill, PROMPTS, 1)
        outputs = _generate(decode, PROMPTS, MAX_TOKENS)
        stats = kv_stats(decode)
    finally:
        _free(prefill)
        _free(decode)
    assert stats.get("kv_connector_load_failures", 0) == 0, stats
    assert stats["kv_connector_tokens_loaded"] > 0, stats
    check("p2p", model, PROMPTS, outputs)


def test_loads_beside_pending_decodes(model: tuple[str, Any, list[list[int]]], tmp_path: Path) -> None:
    """Requests arrive every other step while earlier ones decode (their next token pending on the
    device): load steps and decode steps interleave."""
    from hallm.core.sampling_params import SamplingParams

    producer = make_llm(model[0], storage(tmp_path, "kv_producer"))
    _generate(producer, PROMPTS[:6], 1)
    _free(producer)
    llm = make_llm(model[0], storage(tmp_path, "kv_consumer"))
    engine = llm.engine
    params = SamplingParams(
        temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True, logprobs=0, detokenize=False
    )
    order = [9, 0, 10, 1, 2, 11, 3, 4, 5]  # unsaved ones (9-11) first and between
    done: dict[str, Any] = {}
    step = 0
    while order or engine.has_unfinished_requests():
        if order and step % 2 == 0:
            i = order.pop(0)
            engine.add_request(str(i), {"prompt_token_ids": PROMPTS[i]}, params)
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out.outputs[0]
        step += 1
    stats = kv_stats(llm)
    _free(llm)
    assert stats["kv_connector_tokens_loaded"] > 0 and stats.get("kv_connector_load_failures", 0) == 0, stats
    ids = sorted(done, key=int)
    outputs = []
    for rid in ids:
        c = done[rid]
        lps = [float(e[t].logprob) for t, e in zip(c.token_ids, c.logprobs or [], strict=False)]
        outputs.append((list(c.token_ids), lps))
    check("interleaved", model, [PROMPTS[int(r)] for r in ids], outputs)


def test_truncated_files_recompute(model: tuple[str, Any, list[list[int]]], tmp_path: Path) -> None:
    producer = make_llm(model[0], storage(tmp_path, "kv_producer"))
    _generate(producer, PROMPTS, 1)
    _free(producer)
    for f in sorted(tmp_path.rglob("*.kvb"))[::3]:
        f.write_bytes(f.read_bytes()[:100])
    consumer = make_llm(model[0], storage(tmp_path, "kv_consumer"))
    outputs = _generate(consumer, PROMPTS, MAX_TOKENS)
    stats = kv_stats(consumer)
    _free(consumer)
    assert stats["kv_connector_corrupt_blocks"] >= 1 and stats["kv_connector_load_failures"] >= 1, stats
    check("truncated", model, PROMPTS, outputs)
