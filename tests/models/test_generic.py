"""The generic transformers path: routing, no dense mask, and what it refuses."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from hallm.core.model_loader import load_model
from hallm.core.models import generic, resolve_model_class
from hallm.core.models.generic import GenericCausalLM
from hallm.platforms import ConfigError
from tests.utils.paged_forward import PagedRunner


def test_no_dense_mask_reaches_attention(
    tiny_model_dir: Callable[[str], Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[Any] = []
    original = generic.hallm_paged_attention

    def recording(module: Any, query: Any, key: Any, value: Any, attention_mask: Any, **kw: Any) -> Any:
        seen.append(attention_mask)
        return original(module, query, key, value, attention_mask, **kw)

    monkeypatch.setattr(generic, "hallm_paged_attention", recording)
    try:
        model = load_model(str(tiny_model_dir("gpt_neox"))).model
        PagedRunner(model).step([("a", list(range(3, 20))), ("b", list(range(5, 9)))])
    finally:
        monkeypatch.undo()
        generic._register()
    assert len(seen) == 2 and all(m is None for m in seen)


def test_layers_carry_the_hf_modules_shape(tiny_model_dir: Callable[[str], Path]) -> None:
    model = load_model(str(tiny_model_dir("gemma2"))).model
    assert isinstance(model, GenericCausalLM)
    layers = model.attention_layers()
    assert [a.layer_idx for a in layers] == [0, 1]
    assert [a.sliding_window for a in layers] == [8, None]  # Gemma2 alternates sliding/full
    assert all(a.logits_soft_cap == 5.0 and a.head_size == 32 for a in layers)
    names = {n for n, _ in model.named_parameters()}
    assert all(n.startswith("hf_model.") for n in names)


def test_attention_function_refuses_foreign_modules() -> None:
    q = torch.zeros(1, 2, 3, 4)
    with pytest.raises(RuntimeError, match="has no hallm Attention"):
        generic.hallm_paged_attention(torch.nn.Linear(1, 1), q, q, q, None)


@pytest.mark.parametrize(
    ("config_cls", "arch", "reason"),
    [
        ("BertConfig", "BertModel", "not a transformers causal-LM class"),
        ("MambaConfig", "MambaForCausalLM", "attention-function interface"),
        ("T5Config", "T5ForConditionalGeneration", "encoder-decoder"),
    ],
)
def test_unrunnable_architectures_are_config_errors(config_cls: str, arch: str, reason: str) -> None:
    import transformers

    config = getattr(transformers, config_cls)(architectures=[arch])
    with pytest.raises(ConfigError, match=reason) as err:
        resolve_model_class(config)
    assert "LlamaForCausalLM" in str(err.value)
