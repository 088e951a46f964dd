"""hallm models (native and generic) against HF transformers on the same tiny checkpoints.

Every arch runs through the real loader and the paged CPU reference backend (shuffled block
tables, NaN-poisoned unused cache slots) and must reproduce HF's float32 logits: one full
prefill, chunked prefill plus decode steps reading the cache, and several sequences batched
in one step with prefill and decode mixed.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from hallm.core.model_loader import load_model
from hallm.core.models.generic import GenericCausalLM
from hallm.core.models.llama import (
    LlamaForCausalLM,
    MistralForCausalLM,
    Qwen2ForCausalLM,
    Qwen3ForCausalLM,
)
from tests.utils.paged_forward import PagedRunner, hf_logits
from tests.utils.tiny_models import ALL_ARCHS

ATOL = 1e-4
EXPECTED_CLASS = {
    "llama": LlamaForCausalLM,
    "llama3": LlamaForCausalLM,
    "mistral": MistralForCausalLM,
    "qwen2": Qwen2ForCausalLM,
    "qwen3": Qwen3ForCausalLM,
    "gpt_neox": GenericCausalLM,
    "phi": GenericCausalLM,
    "gemma2": GenericCausalLM,
}


def _tokens(n: int, seed: int) -> list[int]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(3, 512, (n,), generator=gen).tolist()  # skip the 3 special ids


@pytest.fixture(scope="module", params=ALL_ARCHS)
def pair(request: pytest.FixtureRequest, tiny_model_dir: Callable[[str], Path]) -> tuple[str, object, object]:
    """(arch, hallm model, HF model) for one tiny checkpoint."""
    from transformers import AutoModelForCausalLM

    arch = request.param
    path = tiny_model_dir(arch)
    model = load_model(str(path)).model
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    return arch, model, hf


def test_model_class(pair: tuple[str, object, object]) -> None:
    arch, model, _ = pair
    assert type(model) is EXPECTED_CLASS[arch]
    assert len(model.attention_layers()) == 2


def test_prefill_matches_hf(pair: tuple[str, object, object]) -> None:
    _, model, hf = pair
    ids = _tokens(37, seed=1)
    got = PagedRunner(model).step([("a", ids)])[0]
    torch.testing.assert_close(got, hf_logits(hf, ids), atol=ATOL, rtol=0)


def test_chunked_prefill_and_decode_match_hf(pair: tuple[str, object, object]) -> None:
    _, model, hf = pair
    ids = _tokens(30, seed=2)
    runner = PagedRunner(model, seed=3)
    # Chunks that straddle block boundaries (block size 4), then single-token decode steps.
    got = [runner.step([("a", ids[:6])])[0], runner.step([("a", ids[6:19])])[0]]
    got += [runner.step([("a", [t])])[0] for t in ids[19:]]
    torch.testing.assert_close(torch.cat(got), hf_logits(hf, ids), atol=ATOL, rtol=0)


def test_batched_sequences_match_hf(pair: tuple[str, object, object]) -> None:
    _, model, hf = pair
    a, b, c = _tokens(21, seed=4), _tokens(12, seed=5), _tokens(9, seed=6)
    runner = PagedRunner(model, seed=7)
    # Step 1: two prefills. Step 2: a chunk of `a`, a decode of `b`, a fresh prefill of `c`.
    a1, b1 = runner.step([("a", a[:15]), ("b", b[:11])])
    a2, b2, c1 = runner.step([("a", a[15:]), ("b", b[11:]), ("c", c)])
    torch.testing.assert_close(torch.cat([a1, a2]), hf_logits(hf, a), atol=ATOL, rtol=0)
    torch.testing.assert_close(torch.cat([b1, b2]), hf_logits(hf, b), atol=ATOL, rtol=0)
    torch.testing.assert_close(c1, hf_logits(hf, c), atol=ATOL, rtol=0)


def test_sliding_window_is_exercised(tiny_model_dir: Callable[[str], Path]) -> None:
    """The mistral fixture's window (8) is shorter than the prompts: dropping it must change the
    logits, so the match above really tests the window."""
    from transformers import AutoConfig

    path = tiny_model_dir("mistral")
    config = AutoConfig.from_pretrained(path)
    assert config.sliding_window == 8
    config.sliding_window = None
    no_window = load_model(str(path), hf_config=config).model
    windowed = load_model(str(path)).model
    ids = _tokens(24, seed=8)
    diff = PagedRunner(no_window).step([("a", ids)])[0] - PagedRunner(windowed).step([("a", ids)])[0]
    assert diff[:8].abs().max() < ATOL  # inside the window: identical
    assert diff[8:].abs().max() > 1e-2


def test_the_reference_decoder_stack_is_the_layers_op_by_op(tiny_model_dir) -> None:  # type: ignore[no-untyped-def]
    """hallm.ops.reference_ops.llama_decoder_stack, the oracle of a platform's stack entry,
    computes exactly what the layers compute one op at a time (Qwen3: q/k norms, biases)."""
    from hallm.ops.reference_ops import llama_decoder_stack

    path = tiny_model_dir("qwen3")
    steps = [[("a", list(range(3, 20))), ("b", list(range(30, 41)))], [("a", [7]), ("b", [9])]]
    layers = PagedRunner(load_model(str(path)).model)
    stacked_model = load_model(str(path)).model
    weights = stacked_model.model.stack_weights()
    assert weights is not None and len(weights.layers) == len(stacked_model.model.layers)
    stacked_model.model.stack = llama_decoder_stack(weights)
    stacked = PagedRunner(stacked_model)
    for chunks in steps:
        for got, want in zip(stacked.step(chunks), layers.step(chunks), strict=True):
            torch.testing.assert_close(got, want, atol=0, rtol=0)
