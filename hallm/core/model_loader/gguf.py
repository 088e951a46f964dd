"""GGUF checkpoints: converted once to an HF directory in hallm's cache, then loaded like one.

transformers' GGUF support parses the metadata into a config and a tokenizer, dequantizes the
tensors with the `gguf` package and maps llama.cpp names to HF names (undoing llama.cpp's q/k
permutation). transformers parses the file three times (config, tokenizer, tensors) and builds
gguf's tensor-name map once per module of the model, two thirds of a conversion's time: within a
conversion each file is parsed once and each name map built once (`_parsed_once`). It still takes
~15 s for SmolLM2-135M on two cores, so the result is written as an HF
directory (config.json, model.safetensors, tokenizer files, generation_config.json) under
`<cache>/gguf/<key>`, key = hash of the file's real path, size and mtime and of the layout
version of what is written; a changed file gets a new entry. The directory appears atomically
(written under a temporary name, then renamed), so a concurrent or interrupted conversion never
leaves a half-written entry behind.

Weights are stored in float16 when the GGUF stores every matrix in F16, else in float32
(dequantized values are exact in float32), and config.json's `dtype` says which.

Mixture-of-experts files: transformers' GGUF config map drops the experts' widths
(`{arch}.expert_feed_forward_length`, `{arch}.expert_shared_feed_forward_length`) for qwen2moe and
qwen3moe, leaving the config class defaults; they are filled in from the metadata here. A
Mixtral-style file (llama.cpp arch "llama" with experts) is refused: transformers reads it as a
dense Llama and would drop the experts; so is a gpt-oss file, which transformers' reader cannot
convert (_UNREADABLE_MOE). Every parameter of the model must come out of the file with its shape,
else the conversion fails with a ConfigError instead of writing a model with missing or
misshapen weights.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from hallm.platforms import ConfigError
from hallm.platforms.paths import cache_root

logger = logging.getLogger(__name__)

#: Part of the cache key: bumped when what a conversion writes changes, so older entries are redone.
_LAYOUT_VERSION = 2


def gguf_cache_dir(
    gguf_path: str | os.PathLike[str], cache_dir: str | os.PathLike[str] | None = None
) -> Path:
    """Where the converted HF directory of `gguf_path` lives (whether or not it exists yet)."""
    real = os.path.realpath(gguf_path)
    st = os.stat(real)
    ident = f"{real}\0{st.st_size}\0{st.st_mtime_ns}\0{_LAYOUT_VERSION}"
    key = hashlib.sha256(ident.encode()).hexdigest()[:24]
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


@contextlib.contextmanager
def _parsed_once() -> Iterator[None]:
    """Within the block, `gguf.GGUFReader(path)` returns one reader per file and
    `gguf.get_tensor_name_map` one map per (arch, blocks): transformers imports both from the
    `gguf` package at each call and only reads them (readers are read-only memory maps)."""
    import gguf

    reader_cls, name_map = gguf.GGUFReader, gguf.get_tensor_name_map
    readers: dict[tuple[str, str], Any] = {}

    def reader(path: str | os.PathLike[str], mode: str = "r") -> Any:
        key = (os.path.realpath(path), mode)
        if key not in readers:
            readers[key] = reader_cls(path, mode)  # type: ignore[arg-type]
        return readers[key]

    gguf.GGUFReader = reader  # type: ignore[assignment,misc]
    gguf.get_tensor_name_map = functools.cache(name_map)
    try:
        yield
    finally:
        gguf.GGUFReader, gguf.get_tensor_name_map = reader_cls, name_map  # type: ignore[misc]


def _write_hf_dir(path: Path, out: Path) -> None:
    with _parsed_once():
        _convert(path, out)


def _convert(path: Path, out: Path) -> None:
    from safetensors.torch import save_file
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    folder, name = str(path.parent), path.name
    metadata = _read_metadata(path)
    _refuse_unreadable_moe(path, metadata)
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
    _fill_expert_widths(config, metadata)
    # A weightless model only to name the tensors (HF's GGUF name map walks its state_dict).
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)
    parsed = load_gguf_checkpoint(str(path), return_tensors=True, model_to_load=skeleton)
    tensors = _check_tensors(path, parsed["tensors"], skeleton, config)
    matrices = [t for t in tensors.values() if t.ndim >= 2]
    dtype = torch.float16 if matrices and all(t.dtype == torch.float16 for t in matrices) else torch.float32
    tensors = {k: t.to(dtype).contiguous() for k, t in tensors.items()}

    config.dtype = str(dtype).removeprefix("torch.")
    config.save_pretrained(out)
    GenerationConfig.from_model_config(config).save_pretrained(out)
    AutoTokenizer.from_pretrained(folder, gguf_file=name, local_files_only=True).save_pretrained(out)
    _plain_tokenizer_class(out)
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt", "source": path.name})


#: GGUF metadata key suffix -> HF config field that transformers' GGUF config map leaves out.
_EXPERT_WIDTH_KEYS = {
    "expert_feed_forward_length": "moe_intermediate_size",
    "expert_shared_feed_forward_length": "shared_expert_intermediate_size",
}


def _read_metadata(path: Path) -> dict[str, Any]:
    """The GGUF file's scalar metadata (arrays such as the vocabulary left out)."""
    from gguf import GGUFReader, GGUFValueType

    try:
        reader = GGUFReader(str(path))
    except (ValueError, OSError) as e:
        raise ConfigError(f"cannot read GGUF file {path}: {e}") from e
    out: dict[str, Any] = {}
    for key, field in reader.fields.items():
        if field.types and field.types[0] != GGUFValueType.ARRAY:
            out[key] = field.contents()
    out["tensor_names"] = [t.name for t in reader.tensors]
    return out


#: llama.cpp architectures whose MoE files transformers' GGUF reader mis-converts -> why.
_UNREADABLE_MOE = {
    "gpt-oss": (
        "transformers' GGUF reader cannot convert gpt-oss files: it fails on the yarn rope-scaling "
        "metadata and maps neither the attention sinks, the head width nor the split experts"
    ),
}


def _refuse_unreadable_moe(path: Path, metadata: dict[str, Any]) -> None:
    """Refuse, before converting, the MoE files transformers would convert wrong or crash on."""
    arch = metadata.get("general.architecture")
    experts = metadata.get(f"{arch}.expert_count") or 0
    if arch == "llama" and (experts or any("_exps." in n for n in metadata["tensor_names"])):
        raise ConfigError(
            f"GGUF file {path} is a Mixtral-style mixture of experts (llama.cpp architecture 'llama' "
            f"with {experts} experts); transformers' GGUF reader, which hallm converts GGUF files "
            "with, reads 'llama' as a dense Llama and cannot load its experts. Load the model's "
            "HF safetensors checkpoint instead."
        )
    if arch in _UNREADABLE_MOE:
        raise ConfigError(
            f"GGUF file {path} holds a {arch!r} mixture of experts, which hallm cannot load from "
            f"GGUF: {_UNREADABLE_MOE[arch]}. Load the model's HF safetensors checkpoint instead."
        )


def _fill_expert_widths(config: Any, metadata: dict[str, Any]) -> None:
    arch = metadata.get("general.architecture")
    for suffix, field in _EXPERT_WIDTH_KEYS.items():
        value = metadata.get(f"{arch}.{suffix}")
        if value is not None and hasattr(config, field):
            setattr(config, field, int(value))


def _check_tensors(
    path: Path, tensors: dict[str, torch.Tensor], skeleton: torch.nn.Module, config: Any
) -> dict[str, torch.Tensor]:
    """`tensors` holding every parameter of `skeleton` in its shape; raises a ConfigError naming
    what is missing or misshapen. A tensor that differs only by size-1 dims is reshaped:
    transformers turns Qwen2-MoE's shared_expert_gate into [1, 1, H] where a GGUF stores it [1, H]
    (converters that do not squeeze it to [H])."""
    expected = {k: tuple(v.shape) for k, v in skeleton.state_dict().items()}
    if getattr(config, "tie_word_embeddings", False):
        expected.pop("lm_head.weight", None)
    out = dict(tensors)
    missing = sorted(k for k in expected if k not in out)
    wrong = []
    for key, shape in expected.items():
        t = out.get(key)
        if t is None or tuple(t.shape) == shape:
            continue
        squeezed = [d for d in t.shape if d != 1]
        if t.numel() == torch.Size(shape).numel() and squeezed == [d for d in shape if d != 1]:
            out[key] = t.reshape(shape)
        else:
            wrong.append(f"{key} {tuple(t.shape)} (expected {shape})")
    if missing or wrong:
        raise ConfigError(
            f"GGUF file {path} ({config.model_type}) does not convert to a complete "
            f"{config.architectures[0]}: missing {missing[:8]}{' ...' if len(missing) > 8 else ''}, "
            f"misshapen {wrong[:8]}"
        )
    return out


def _plain_tokenizer_class(out: Path) -> None:
    """Make the saved tokenizer load as the plain tokenizers-backed class: tokenizer.json holds the
    pipeline transformers built from the GGUF's tokenizer.ggml.* (pre-tokenizer split chosen by
    tokenizer.ggml.pre), while a model-specific class such as Qwen2Tokenizer replaces that
    pre-tokenizer with its own regex on load, splitting text differently from the file."""
    config_file = out / "tokenizer_config.json"
    tok_config = json.loads(config_file.read_text())
    tok_config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config_file.write_text(json.dumps(tok_config, indent=2, ensure_ascii=False) + "\n")
