"""The interface every hallm model class implements (native, generic, or plugin-contributed).

A model runs the step's packed tokens: all requests' new tokens laid end to end on one axis,
no batch dimension. Attention goes through `hallm.core.layers.attention.Attention` layers, which
read the step's layout from the forward context the runner sets, so the model's own code never
sees block tables, backends or devices.

```
class MyModel(nn.Module):
    def __init__(self, config: transformers.PretrainedConfig) -> None
        # Build modules. Each attention layer is
        # Attention(num_heads, head_size, scale, num_kv_heads, layer_idx, sliding_window=...).
    def forward(self, input_ids: LongTensor[T], positions: LongTensor[T]) -> Tensor[T, hidden]
    def compute_logits(self, hidden: Tensor[N, hidden]) -> Tensor[N, vocab]   # float32
    def load_weights(self, weights: Iterable[tuple[str, Tensor]]) -> set[str]
        # HF checkpoint names in; returns the names of the model's parameters it filled.
        # Raises CheckpointMismatchError for missing/unexpected/mis-shaped weights.
    def attention_layers(self) -> list[Attention]   # ordered by layer_idx
    supports_meta_init: ClassVar[bool] = True       # optional, see below
```

Construction: the loader builds a model whose `supports_meta_init` is true (the default) under
`torch.device("meta")`, then materializes its parameters on the target device (`to_empty`) and
fills them from the checkpoint, so no memory or time is spent on a throw-away random init.
Buffers that hold real values after `__init__` (e.g. rotary inverse frequencies, computed on
an explicit CPU device) are kept and moved to the device; a buffer left on the meta device is
an error. A model that cannot be built that way sets `supports_meta_init = False` and is built
directly on the device.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, ClassVar, Protocol, runtime_checkable

import torch
from torch import nn

from hallm.core.layers.attention import Attention
from hallm.platforms import ConfigError


class CheckpointMismatchError(ConfigError):
    """The checkpoint's weights do not fit the model (missing, unexpected or mis-shaped)."""


@runtime_checkable
class CausalLM(Protocol):
    """Structural type of a hallm model (see the module docstring for the contract)."""

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor: ...

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor: ...

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]: ...

    def attention_layers(self) -> list[Attention]: ...


def find_attention_layers(module: nn.Module) -> list[Attention]:
    """Every `Attention` layer under `module`, ordered by `layer_idx`."""
    layers = [m for m in module.modules() if isinstance(m, Attention)]
    layers.sort(key=lambda m: m.layer_idx)
    idx = [m.layer_idx for m in layers]
    if len(set(idx)) != len(idx):
        raise ValueError(f"attention layers share a layer_idx: {idx}")
    return layers


def layer_sliding_window(config: Any, layer_idx: int) -> int | None:
    """The sliding window of layer `layer_idx`: from `config.layer_types` when the config has
    per-layer types ("sliding_attention" / "full_attention"), else `config.sliding_window`."""
    window = getattr(config, "sliding_window", None)
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None and layer_idx < len(layer_types):
        return window if layer_types[layer_idx] == "sliding_attention" else None
    return window


class ModelBase(nn.Module):
    """Optional base class for models: `attention_layers()` and the meta-init flag."""

    supports_meta_init: ClassVar[bool] = True
    #: The model builds its own rank's shard when `hallm.core.distributed.tp_world_size()` > 1
    #: and its `load_weights` keeps only that shard. Models that do not are refused at TP > 1.
    supports_tensor_parallel: ClassVar[bool] = False
    #: Why a model that cannot be split refuses (shown to the user), when there is a reason to give.
    tensor_parallel_refusal: ClassVar[str | None] = None
    #: The model's forward reads no device value on the host, so a decode step may be captured
    #: in a device graph (`Platform.step_graphs`). Models that do run eagerly.
    supports_step_graphs: ClassVar[bool] = True

    def attention_layers(self) -> list[Attention]:
        """This model's attention layers, ordered by layer_idx (the runner binds these)."""
        return find_attention_layers(self)
