"""HF model directories: config.json plus safetensors (one file or sharded with an index)."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from hallm.platforms import ConfigError

SAFE_INDEX = "model.safetensors.index.json"
SAFE_SINGLE = "model.safetensors"


def load_config(model_dir: str | os.PathLike[str]) -> Any:
    """The transformers config of an HF model directory (local files only); for a multimodal
    checkpoint with a causal-LM text model, the text config alone (see `text_model_config`)."""
    from transformers import AutoConfig

    from hallm.core.models.registry import text_model_config

    if not (Path(model_dir) / "config.json").is_file():
        raise ConfigError(f"{model_dir} has no config.json; pass an HF model directory or a .gguf file")
    return text_model_config(AutoConfig.from_pretrained(str(model_dir), local_files_only=True))


def safetensors_files(model_dir: str | os.PathLike[str]) -> list[Path]:
    """The checkpoint's safetensors files: the index's shards, model.safetensors, or every *.safetensors."""
    root = Path(model_dir)
    index = root / SAFE_INDEX
    if index.is_file():
        weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
        files = [root / f for f in sorted(set(weight_map.values()))]
        absent = [str(f) for f in files if not f.is_file()]
        if absent:
            raise ConfigError(f"{index} names shards that do not exist: {absent}")
        return files
    if (root / SAFE_SINGLE).is_file():
        return [root / SAFE_SINGLE]
    files = sorted(root.glob("*.safetensors"))
    if files:
        return files
    others = sorted(p.name for p in root.glob("*.bin")) + sorted(p.name for p in root.glob("*.pt"))
    hint = (
        f" (found {others}: convert them with transformers' save_pretrained(safe_serialization=True))"
        if others
        else ""
    )
    raise ConfigError(f"no safetensors weights in {root}{hint}")


def iterate_safetensors(
    files: list[Path], device: torch.device | str = "cpu"
) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) for every tensor of `files`, read straight onto `device` when safetensors can
    (CUDA, XPU, MPS, ...) and onto the CPU otherwise (the model's `load_weights` copies it over)."""
    from safetensors import SafetensorError, safe_open

    target = str(device)
    for path in files:
        try:
            try:
                handle = safe_open(str(path), framework="pt", device=target)
            except Exception:  # a device string safetensors does not know: read on CPU
                handle = safe_open(str(path), framework="pt", device="cpu")
            with handle as f:
                for name in f.keys():  # noqa: SIM118 - safe_open handles have keys(), not __iter__
                    yield name, f.get_tensor(name)
        except SafetensorError as err:
            raise ConfigError(
                f"weight file {path} is not a readable safetensors file ({err}); it is truncated or "
                "corrupt: download it again (or re-save the model with save_pretrained)"
            ) from err
