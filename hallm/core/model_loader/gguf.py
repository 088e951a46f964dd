"""GGUF checkpoints: converted once to an HF directory in hallm's cache, then loaded like one.

transformers' GGUF support parses the metadata into a config and a tokenizer, dequantizes the
tensors with the `gguf` package and maps llama.cpp names to HF names (undoing llama.cpp's q/k
permutation). That takes ~25 s for SmolLM2-135M on two cores, so the result is written as an HF
directory (config.json, model.safetensors, tokenizer files, generation_config.json) under
`<cache>/gguf/<key>`, key = hash of the file's real path, size and mtime; a changed file gets a
new entry. The directory appears atomically (written under a temporary name, then renamed), so a
concurrent or interrupted conversion never leaves a half-written entry behind.

Weights are stored in float16 when the GGUF stores every matrix in F16, else in float32
(dequantized values are exact in float32), and config.json's `dtype` says which.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import uuid
from pathlib import Path

import torch

from hallm.platforms import ConfigError
from hallm.platforms.paths import cache_root

logger = logging.getLogger(__name__)


def gguf_cache_dir(
    gguf_path: str | os.PathLike[str], cache_dir: str | os.PathLike[str] | None = None
) -> Path:
    """Where the converted HF directory of `gguf_path` lives (whether or not it exists yet)."""
    real = os.path.realpath(gguf_path)
    st = os.stat(real)
    key = hashlib.sha256(f"{real}\0{st.st_size}\0{st.st_mtime_ns}".encode()).hexdigest()[:24]
    return cache_root(cache_dir) / "gguf" / key


def convert_gguf(gguf_path: str | os.PathLike[str], cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """The HF directory holding `gguf_path` converted; converts on the first call."""
    path = Path(gguf_path)
    if not path.is_file():
        raise ConfigError(f"GGUF file {path} does not exist")
    target = gguf_cache_dir(path, cache_dir)
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".tmp-{target.name}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    logger.info("converting %s to an HF directory in %s (once; takes a while)", path, target)
    try:
        tmp.mkdir()
        _write_hf_dir(path, tmp)
        try:
            os.rename(tmp, target)
        except OSError:
            if not (target / "config.json").is_file():  # not a lost race with another converter
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _write_hf_dir(path: Path, out: Path) -> None:
    from safetensors.torch import save_file
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    folder, name = str(path.parent), path.name
    try:
        config = AutoConfig.from_pretrained(folder, gguf_file=name, local_files_only=True)
    except ValueError as e:  # transformers: "GGUF model with architecture X is not supported yet."
        raise ConfigError(f"cannot read GGUF file {path}: {e}") from e
    if not getattr(config, "architectures", None):
        arch = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(config.model_type)
        if arch is None:
            raise ConfigError(
                f"GGUF file {path} holds a {config.model_type!r} model, which is not a causal LM"
            )
        config.architectures = [arch]
    # A weightless model only to name the tensors (HF's GGUF name map walks its state_dict).
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)
    parsed = load_gguf_checkpoint(str(path), return_tensors=True, model_to_load=skeleton)
    tensors: dict[str, torch.Tensor] = parsed["tensors"]
    matrices = [t for t in tensors.values() if t.ndim >= 2]
    dtype = torch.float16 if matrices and all(t.dtype == torch.float16 for t in matrices) else torch.float32
    tensors = {k: t.to(dtype).contiguous() for k, t in tensors.items()}

    config.dtype = str(dtype).removeprefix("torch.")
    config.save_pretrained(out)
    GenerationConfig.from_model_config(config).save_pretrained(out)
    AutoTokenizer.from_pretrained(folder, gguf_file=name, local_files_only=True).save_pretrained(out)
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt", "source": path.name})
