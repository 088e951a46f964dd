"""Rotary position embedding (RoPE), with every rope type transformers knows.

Inverse frequencies come from transformers' own `ROPE_INIT_FUNCTIONS` (linear, dynamic, yarn,
longrope, llama3, ...), so scaled variants match HF exactly; only the unscaled "default" form
is computed here (it is not in that table). cos/sin are computed per step from the positions
([T] x [rotary_dim/2] multiplies), which is as cheap as a table lookup and needs no
max-length cache.

Static-cache notes (the KV cache holds keys rotated at write time):
- "dynamic" (NTK) uses the frequencies HF starts with (those for `max_position_embeddings`);
  HF re-scales once a batch grows past that length, which a paged cache cannot follow.
- "longrope" picks its factors per request, never per step (see `longrope_use_long`).
"""

from __future__ import annotations

from typing import Any, cast

import torch
from torch import nn

from hallm.core.layers.op_context import current_ops
from hallm.ops.reference_ops import apply_rotary, rotary_cos_sin
from hallm.platforms import ConfigError
from hallm.platforms.forward_context import peek_forward_context


def rope_parameters(config: Any) -> dict[str, Any]:
    """The config's rope parameters in transformers' v5 form (`rope_type`, `rope_theta`, ...)."""
    params = dict(getattr(config, "rope_parameters", None) or {})
    params.setdefault("rope_type", "default")
    if "rope_theta" not in params:
        params["rope_theta"] = getattr(config, "rope_theta", 10000.0)
    return params


def _default_inv_freq(config: Any, head_size: int, params: dict[str, Any]) -> torch.Tensor:
    dim = int(head_size * params.get("partial_rotary_factor", 1.0))
    exponent = torch.arange(0, dim, 2, dtype=torch.int64, device="cpu").float() / dim
    return 1.0 / (params["rope_theta"] ** exponent)


def compute_inv_freq(config: Any, head_size: int, seq_len: int | None = None) -> tuple[torch.Tensor, float]:
    """(inv_freq float32 [rotary_dim/2] on CPU, attention scaling of cos/sin) for `config`."""
    params = rope_parameters(config)
    rope_type = params["rope_type"]
    if rope_type == "default":
        return _default_inv_freq(config, head_size, params), 1.0
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    init_fn = ROPE_INIT_FUNCTIONS.get(rope_type)
    if init_fn is None:
        known = ["default", *sorted(ROPE_INIT_FUNCTIONS)]
        raise ConfigError(f"rope type {rope_type!r} is not known to transformers; known types: {known}")
    inv_freq, scaling = init_fn(config, torch.device("cpu"), seq_len=seq_len)
    return inv_freq.float(), float(scaling)


def longrope_use_long(positions: torch.Tensor, original_max_position: int) -> torch.Tensor:
    """bool [T]: which tokens take long-rope's long factors.

    HF picks the factors per forward from the sequence's length (largest position + 1 >
    `original_max_position`) and keeps earlier keys as they were rotated. Per token of a
    request that is: long iff its position is past the original context, or the request's
    prompt (computed in one HF forward) is longer than it. This depends on the request
    alone, so batching, chunked prefill and preemption do not change a request's output.
    Inside a step the prompt lengths come from the layout (vectorized: each token finds its
    request by a search over `query_start_loc`); without them (a captured decode graph,
    where every token is past its prompt) the position alone decides, which is the same rule.
    Outside any step (a direct call) the tokens are one sequence, as in HF.
    """
    ctx = peek_forward_context()
    if ctx is None:
        return (positions.max() >= original_max_position).expand(positions.shape)
    use_long = positions >= original_max_position
    tensors = ctx.layout.tensors
    prompt_lens = tensors.num_prompt_tokens if tensors is not None else None
    if prompt_lens is None or ctx.layout.num_reqs == 0:
        return use_long
    qsl = tensors.query_start_loc[1 : ctx.layout.num_reqs + 1]  # type: ignore[union-attr]
    token = torch.arange(positions.numel(), device=positions.device, dtype=qsl.dtype)
    # Padding tokens past the last request map to num_reqs: clamp (their output is unused).
    req = torch.searchsorted(qsl, token, right=True).clamp_(max=ctx.layout.num_reqs - 1)
    return use_long | (prompt_lens[req] > original_max_position)


class RotaryEmbedding(nn.Module):
    """forward(positions [T], q [T, Hq, D], k [T, Hk, D]) -> (q, k) rotated by position."""

    inv_freq: torch.Tensor  # float32 [rotary_dim / 2]
    long_inv_freq: torch.Tensor  # longrope only: the long factors' frequencies

    def __init__(self, config: Any, head_size: int) -> None:
        super().__init__()
        # On CPU even under a `torch.device("meta")` build: the loader keeps real buffers
        # (see hallm.core.models.interface) and moves them to the model's device.
        with torch.device("cpu"):
            inv_freq, self.attention_scaling = compute_inv_freq(config, head_size)
            long_inv_freq = self._long_inv_freq(config, head_size)
        self.rotary_dim = 2 * inv_freq.numel()
        if self.rotary_dim > head_size:
            raise ConfigError(f"rotary dim {self.rotary_dim} exceeds head size {head_size}; check the config")
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.original_max_position: int | None = None
        if long_inv_freq is not None:
            self.original_max_position = int(rope_parameters(config)["original_max_position_embeddings"])
            self.register_buffer("long_inv_freq", long_inv_freq, persistent=False)
        # The table's rotary takes fixed frequencies over the whole head; long-rope's switch and
        # partial rotary run here.
        self.plain = self.original_max_position is None and self.rotary_dim == head_size
        op = current_ops().rotary
        assert op is not None  # current_ops() fills every elementwise entry
        self._op = op

    @staticmethod
    def _long_inv_freq(config: Any, head_size: int) -> torch.Tensor | None:
        params = rope_parameters(config)
        if params["rope_type"] != "longrope":
            return None
        seq_len = int(params["original_max_position_embeddings"]) + 1
        return compute_inv_freq(config, head_size, seq_len=seq_len)[0]

    def forward(
        self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if self.plain:
            return self._op(positions, q, k, self.inv_freq, self.attention_scaling)
        if self.original_max_position is None:
            cos, sin = rotary_cos_sin(positions, self.inv_freq, self.attention_scaling, q.dtype)
            return apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        # Per-token select between the two factor sets: no host sync, graph-capturable.
        use_long = longrope_use_long(positions, self.original_max_position)  # [T]
        inv_freq = torch.where(use_long[:, None], self.long_inv_freq, self.inv_freq)  # [T, D/2]
        freqs = positions.to(torch.float32)[:, None] * inv_freq
        cos = (freqs.cos() * self.attention_scaling).to(q.dtype)[:, None, :]
        sin = (freqs.sin() * self.attention_scaling).to(q.dtype)[:, None, :]
        return apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)

    def extra_repr(self) -> str:
        return f"rotary_dim={self.rotary_dim}, attention_scaling={self.attention_scaling}"


class LongRopeCosSin(nn.Module):
    """Stands in for a transformers long-rope rotary module (the generic path's models):
    forward(x, position_ids [1, T]) -> (cos, sin) [1, T, rotary_dim] in x's dtype, HF's
    "rotate half" form, the factors picked per token by `longrope_use_long` instead of once
    for the whole packed step."""

    inv_freq: torch.Tensor  # float32 [rotary_dim / 2]
    long_inv_freq: torch.Tensor

    def __init__(self, hf_rotary: nn.Module) -> None:
        from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

        super().__init__()
        config: Any = hf_rotary.config
        self.original_max_position = int(config.rope_parameters["original_max_position_embeddings"])
        init_fn = ROPE_INIT_FUNCTIONS["longrope"]
        with torch.device("cpu"):
            short, scaling = init_fn(config, torch.device("cpu"))
            long, _ = init_fn(config, torch.device("cpu"), seq_len=self.original_max_position + 1)
        device = cast(torch.Tensor, hf_rotary.inv_freq).device
        self.attention_scaling = float(scaling)
        self.register_buffer("inv_freq", short.float().to(device), persistent=False)
        self.register_buffer("long_inv_freq", long.float().to(device), persistent=False)

    def forward(self, x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        positions = position_ids[0]
        use_long = longrope_use_long(positions, self.original_max_position)  # [T]
        inv_freq = torch.where(use_long[:, None], self.long_inv_freq, self.inv_freq)  # [T, D/2]
        freqs = positions.to(torch.float32)[:, None] * inv_freq
        emb = torch.cat((freqs, freqs), dim=-1)[None]  # [1, T, rotary_dim]
        cos = emb.cos() * self.attention_scaling
        sin = emb.sin() * self.attention_scaling
        return cos.to(x.dtype), sin.to(x.dtype)


def is_hf_longrope_rotary(module: nn.Module) -> bool:
    """A transformers rotary module of one long-rope type (not per-layer-type rope dicts)."""
    return getattr(module, "rope_type", None) == "longrope" and isinstance(
        getattr(module, "inv_freq", None), torch.Tensor
    )
