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
