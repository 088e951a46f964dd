"""`load_model`: config + model class + weights, on a device, in a dtype."""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import nn

from hallm.core.distributed import tp_world_size
from hallm.core.layers.op_context import KernelLayer, building_with
from hallm.core.model_loader.dtype import dtype_name, resolve_dtype
from hallm.core.model_loader.dummy import init_dummy_weights
from hallm.core.model_loader.hf import iterate_safetensors, load_config, safetensors_files
from hallm.core.model_loader.source import resolve_source
from hallm.core.models.registry import resolve_model_class
from hallm.platforms import DTYPE_NAMES, ConfigError
from hallm.platforms.ops import OpTable

logger = logging.getLogger(__name__)

LOAD_FORMATS = ("auto", "safetensors", "gguf", "dummy")


class LoadedModel(NamedTuple):
    """What `load_model` returns.

    model: the hallm model (eval mode) on the device, parameters in `dtype`.
    hf_config: its transformers config.
    dtype: the resolved model dtype.
    model_dir: the HF directory read (for a GGUF file: its converted cache directory; None when
        the config was passed in for dummy weights). Tokenizer and generation config live there.
    """

    model: nn.Module
    hf_config: Any
    dtype: torch.dtype
    model_dir: Path | None


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype) -> Iterator[None]:
    prev = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(prev)


def _materialize(model: nn.Module, device: torch.device) -> None:
    """Allocate a meta-built model's parameters on `device` (uninitialized), keeping its real
    buffers and its weight ties (`to_empty` would drop both)."""
    ties: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        ties.setdefault(id(param), []).append(name)
    buffers: dict[str, torch.Tensor] = {}
    for name, buf in model.named_buffers():
        if not buf.is_meta:
            buffers[name] = buf
            continue
        module_name, _, leaf = name.rpartition(".")
        owner = model.get_submodule(module_name)
        if leaf in owner._non_persistent_buffers_set:
            raise RuntimeError(
                f"{type(model).__name__} built buffer {name} on the meta device; compute it on an "
                "explicit device (e.g. inside `with torch.device('cpu')`) or set supports_meta_init = False"
            )
    model.to_empty(device=device)
    for name, buf in buffers.items():
        module_name, _, leaf = name.rpartition(".")
        model.get_submodule(module_name)._buffers[leaf] = buf.to(device)
    for names in ties.values():
        first = model.get_parameter(names[0])
        for other in names[1:]:
            module_name, _, leaf = other.rpartition(".")
            setattr(model.get_submodule(module_name), leaf, first)


def build_model(
    cls: type, hf_config: Any, device: torch.device | str, dtype: torch.dtype, ops: OpTable | None = None
) -> nn.Module:
    """Instantiate `cls(hf_config)` with parameters in `dtype` on `device`, weights unset
    (on the meta device first when the class allows it, see hallm.core.models.interface), its
    layers built with the op table `ops` (None: the references)."""
    device = torch.device(device)
    with _default_dtype(dtype), building_with(ops):
        if getattr(cls, "supports_meta_init", True):  # declared by ModelBase; a plugin's model may omit it
            with torch.device("meta"):
                model = cls(hf_config)
            _materialize(model, device)
        else:
            with torch.device(device):
                model = cls(hf_config)
    return model.eval()


def prepare_kernels(model: nn.Module) -> None:
    """Let every `KernelLayer` build its op-table kernels from its loaded weights, children
    before parents (a decoder stack uses its layers' linear kernels)."""
    with torch.no_grad():
        for module in reversed(list(model.modules())):
            if isinstance(module, KernelLayer):
                module.prepare_kernels()


def load_model(
    model: str | os.PathLike[str] | None,
    device: torch.device | str = "cpu",
    dtype: str | torch.dtype = "auto",
    *,
    supported_dtypes: Sequence[str] = DTYPE_NAMES,
    load_format: str = "auto",
    gguf_file: str | None = None,
    hf_config: Any = None,
    extra_models: Mapping[str, type] | None = None,
    seed: int = 0,
    cache_dir: str | os.PathLike[str] | None = None,
    ops: OpTable | None = None,
) -> LoadedModel:
    """Load a model for hallm.

    model: an HF model directory (config.json + safetensors, single or sharded), a .gguf file
        (or a directory plus `gguf_file`); None only with `load_format="dummy"` and `hf_config`.
    device: the torch device for the weights.
    dtype: a torch dtype, or "auto" (the checkpoint's dtype if in `supported_dtypes`, else `supported_dtypes[0]`),
        or float32 | bfloat16 | float16.
    supported_dtypes: the platform's dtype names, default first (`Capabilities.dtypes`).
    load_format: "auto" (by the path), "safetensors", "gguf", or "dummy" (random weights of the
        real shapes, seeded by `seed`, std = config.initializer_range or 0.02).
    hf_config: use this config instead of reading one (dummy weights need nothing else).
    extra_models: plugin-contributed architecture -> model class (checked first).
    cache_dir: root of hallm's cache for converted GGUF files (default $HALLM_CACHE_DIR or
        ~/.cache/hallm).
    ops: the platform's op table the native layers are built with (None: the references).
    """
    if load_format not in LOAD_FORMATS:
        raise ConfigError(f"unknown load format {load_format!r}; valid: {', '.join(LOAD_FORMATS)}")
    dummy = load_format == "dummy"
    model_dir: Path | None = None
    if model is None:
        if not (dummy and hf_config is not None):
            raise ConfigError("no model given; pass a HF model directory or a .gguf file")
    else:
        source = resolve_source(model, gguf_file)
        if load_format == "gguf" and source.gguf_path is None:
            raise ConfigError(f"load_format='gguf' but {model} is not a GGUF file")
        if load_format == "safetensors" and source.hf_dir is None:
            raise ConfigError(f"load_format='safetensors' but {model} is a GGUF file")
        if dummy and hf_config is None and source.gguf_path is not None:
            # Metadata only (no dequantization) is enough for dummy weights.
            from transformers import AutoConfig

            hf_config = AutoConfig.from_pretrained(
                str(source.gguf_path.parent), gguf_file=source.gguf_path.name, local_files_only=True
            )
        elif not (dummy and source.gguf_path is not None):
            model_dir = source.local_dir(cache_dir)
    if hf_config is None:
        assert model_dir is not None  # set above whenever no config was given or read
        hf_config = load_config(model_dir)

    if isinstance(dtype, torch.dtype):
        dtype = dtype_name(dtype) or "auto"
    torch_dtype = resolve_dtype(dtype, getattr(hf_config, "dtype", None), supported_dtypes)
    cls = resolve_model_class(hf_config, extra_models)
    if tp_world_size() > 1:
        check_splittable(cls)
    net: Any = build_model(cls, hf_config, device, torch_dtype, ops)
    if dummy:
        init_dummy_weights(net, std=float(getattr(hf_config, "initializer_range", None) or 0.02), seed=seed)
    else:
        assert model_dir is not None
        files = safetensors_files(model_dir)
        with torch.no_grad():
            net.load_weights(iterate_safetensors(files, device))
    prepare_kernels(net)
    logger.info(
        "loaded %s (%s) as %s in %s on %s",
        model_dir or "dummy weights",
        cls.__name__,
        getattr(hf_config, "model_type", "?"),
        torch_dtype,
        device,
    )
    return LoadedModel(net, hf_config, torch_dtype, model_dir)


def check_splittable(cls: type) -> None:
    """Raise ConfigError when model class `cls` cannot be split across tensor-parallel ranks."""
    if not getattr(cls, "supports_tensor_parallel", False):
        why = getattr(cls, "tensor_parallel_refusal", None)
        raise ConfigError(
            f"{cls.__name__} cannot be split across tensor-parallel ranks{f' ({why})' if why else ''}; "
            "use tensor_parallel_size 1"
        )
