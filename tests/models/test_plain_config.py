"""The model config a tensor-parallel rank gets (`plain_config`): it answers every attribute
exactly as transformers' config does, builds the same model, and unpickles without importing
transformers; where the class is still needed (a model built by the generic path, a rope type
with transformers' functions) the config goes as it is."""

from __future__ import annotations

import pickle
import subprocess
import sys
from typing import Any

import pytest
import torch

from hallm.core.model_loader.plain_config import PlainConfig, plain_config
from tests.utils.tiny_models import GENERIC_ARCHS, MOE_ARCHS, NATIVE_ARCHS, tiny_config

NATIVE = (*NATIVE_ARCHS, *MOE_ARCHS, "gpt_oss")


def _attribute_names(config: Any) -> set[str]:
    names = {n for n in dir(config) if not n.startswith("_")}
    return names | set(getattr(config, "attribute_map", {}))


def _same(a: Any, b: Any) -> bool:
    if isinstance(b, PlainConfig):
        return all(_same(getattr(a, n), getattr(b, n)) for n in _attribute_names(a) if _readable(a, n))
    return bool(a == b) if not isinstance(a, torch.Tensor) else torch.equal(a, b)


def _readable(config: Any, name: str) -> bool:
    try:
        return not callable(getattr(config, name))
    except Exception:
        return False


@pytest.mark.parametrize("arch", NATIVE)
def test_every_attribute_reads_the_same(arch: str) -> None:
    config = tiny_config(arch, 512)
    plain = plain_config(config)
    if not isinstance(plain, PlainConfig):
        # only a rope type of transformers' functions keeps a native model's config as it is
        assert (getattr(config, "rope_parameters", None) or {}).get("rope_type", "default") != "default"
        pytest.skip(f"{arch}: rope type {config.rope_parameters['rope_type']} needs transformers' config")
    names = [n for n in _attribute_names(config) if _readable(config, n)]
    assert "hidden_size" in names and "num_key_value_heads" in names
    for name in names:
        real = getattr(config, name)
        if type(real).__module__.split(".")[0] == "transformers" and not hasattr(real, "attribute_map"):
            # a view object of transformers' (per-layer settings): absent, so a read fails loudly
            assert not hasattr(plain, name), name
            continue
        assert _same(real, getattr(plain, name)), name


@pytest.mark.parametrize("arch", NATIVE)
def test_builds_the_same_model(arch: str) -> None:
    from hallm.core.model_loader.dummy import init_dummy_weights
    from hallm.core.model_loader.loader import build_model
    from hallm.core.models.registry import resolve_model_class

    config = tiny_config(arch, 512)
    models = []
    for c in (config, plain_config(config)):
        net = build_model(resolve_model_class(c), c, "cpu", torch.float32, None)
        init_dummy_weights(net, std=0.02, seed=0)
        models.append(net)
    real, plain = models
    assert repr(real) == repr(plain)
    a, b = real.state_dict(), plain.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("arch", GENERIC_ARCHS)
def test_generic_path_keeps_the_config(arch: str) -> None:
    config = tiny_config(arch, 512)
    assert plain_config(config) is config


def test_a_plugin_architecture_keeps_the_config() -> None:
    config = tiny_config("llama", 512)
    assert isinstance(plain_config(config), PlainConfig)
    assert plain_config(config, {"LlamaForCausalLM": object}) is config


def test_unpickles_without_transformers() -> None:
    """What a rank process does with it first: no transformers module is imported, for every
    native arch the copy is made for."""
    plain = [plain_config(tiny_config(arch, 512)) for arch in NATIVE]
    plain = [p for p in plain if isinstance(p, PlainConfig)]
    assert len(plain) >= len(NATIVE) - 2  # all but llama3 rope and gpt_oss's yarn
    code = (
        "import pickle, sys; c = pickle.loads(sys.stdin.buffer.read()); "
        "print(c[0].hidden_size, c[0].model_type, any(m.split('.')[0] == 'transformers' for m in sys.modules))"
    )
    data = pickle.dumps(plain)
    out = subprocess.run([sys.executable, "-c", code], input=data, capture_output=True, check=True)
    assert out.stdout.decode().split() == ["64", plain[0].model_type, "False"]


def test_a_value_that_needs_transformers_keeps_the_config() -> None:
    """An instance attribute holding an object of transformers' (here its GenerationConfig, in a
    list) would import transformers in the rank: the config goes as it is."""
    from transformers import GenerationConfig

    config = tiny_config("qwen2", 512)
    config.hallm_extra = [GenerationConfig()]
    assert plain_config(config) is config


def test_to_dict_is_the_configs() -> None:
    """A KV connector identifies the model by `to_dict()`: ranks and the engine must agree."""
    config = tiny_config("qwen3_moe", 512)
    assert plain_config(config).to_dict() == config.to_dict()


@pytest.mark.parametrize("arch", ["qwen2", "llama3", "gpt_neox"])
def test_what_a_rank_and_the_engine_process_get(arch: str) -> None:
    """`with_plain_model_config`: the engine config a rank and the server's engine process are
    sent; only the model config differs, and only where `plain_config` copies it."""
    from hallm.core.config import CacheConfig, EngineConfig, ModelConfig, ParallelConfig, SchedulerConfig
    from hallm.core.model_loader.plain_config import with_plain_model_config

    hf = tiny_config(arch, 512)
    model = ModelConfig("m", None, "float32", 128, 0, "dummy", hf)
    config = EngineConfig(model, CacheConfig(), SchedulerConfig(), ParallelConfig(), {"name": "cpu"})
    sent = with_plain_model_config(config)
    if arch == "qwen2":
        assert isinstance(sent.model.hf_config, PlainConfig) and sent.model.hf_config.num_key_value_heads == 2
        assert sent.cache is config.cache and sent.model.max_model_len == 128
        assert config.model.hf_config is hf  # the caller's config is left as it was
    else:  # llama3 rope; the generic path
        assert sent is config
