"""A mixture-of-experts MLP through the op table's `fused_moe`, and the routers of the families.

The experts' weights are stacked over experts in transformers' in-memory layout, so fused
checkpoints load unchanged and per-expert checkpoints load through
`hallm.core.models.weights.ExpertShard`:
- `gate_up_proj` [E, 2 * I_local, H]: rows [0, I_local) the gate, [I_local, 2 * I_local) the up;
- `down_proj` [E, H, I_local];
- with `bias` (gpt-oss): `gate_up_proj_bias` [E, 2 * I_local] (gate half, up half) and
  `down_proj_bias` [E, H].
With tensor parallelism (`tp_size` > 1) each rank holds a contiguous slice of every expert's
intermediate dimension (I_local = I / tp_size, rank r owns [r * I_local, (r + 1) * I_local)) and
returns its partial sum; the caller all-reduces. The down projection's bias is whole on every
rank and added by rank 0 only, so the all-reduce counts it once. The router runs on every rank
in full.
"""

from __future__ import annotations

import torch
from torch import nn

from hallm.core.layers.op_context import current_ops
from hallm.ops.reference_ops import softmax_topk
from hallm.platforms import ConfigError
from hallm.platforms.ops import SILU_GLU, MoEActivation


class FusedMoE(nn.Module):
    """forward(hidden [T, H], topk_weights float32 [T, K], topk_ids [T, K]) -> [T, H]."""

    def __init__(
        self,
        num_experts: int,
        hidden_size: int,
        intermediate_size: int,
        tp_rank: int = 0,
        tp_size: int = 1,
        activation: MoEActivation = SILU_GLU,
        bias: bool = False,
    ) -> None:
        super().__init__()
        if tp_size < 1 or not 0 <= tp_rank < tp_size:
            raise ConfigError(f"MoE layer: tp_rank {tp_rank} must be in [0, tp_size {tp_size})")
        if intermediate_size % tp_size:
            raise ConfigError(
                f"the experts' intermediate size {intermediate_size} does not divide by the "
                f"tensor-parallel size {tp_size}; choose a tensor-parallel size that divides it"
            )
        self.num_experts = num_experts
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.tp_rank, self.tp_size = tp_rank, tp_size
        self.local_intermediate = intermediate_size // tp_size
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts, 2 * self.local_intermediate, hidden_size))
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden_size, self.local_intermediate))
        self.activation = activation
        self.gate_up_proj_bias: nn.Parameter | None = None
        self.down_proj_bias: nn.Parameter | None = None
        if bias:
            self.gate_up_proj_bias = nn.Parameter(torch.empty(num_experts, 2 * self.local_intermediate))
            self.down_proj_bias = nn.Parameter(torch.empty(num_experts, hidden_size))
        op = current_ops().fused_moe
        assert op is not None  # current_ops() fills every elementwise entry
        self._op = op

    def forward(
        self, hidden: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor
    ) -> torch.Tensor:
        return self._op(
            hidden,
            topk_weights,
            topk_ids,
            self.gate_up_proj,
            self.down_proj,
            activation=self.activation,
            w13_bias=self.gate_up_proj_bias,
            w2_bias=self.down_proj_bias if self.tp_rank == 0 else None,
        )

    def extra_repr(self) -> str:
        return (
            f"num_experts={self.num_experts}, hidden={self.hidden_size}, "
            f"intermediate={self.intermediate_size}, tp={self.tp_rank}/{self.tp_size}, "
            f"activation={self.activation}, bias={self.down_proj_bias is not None}"
        )


class SoftmaxTopKRouter(nn.Module):
    """Mixtral / Qwen-MoE / OLMoE router: logits = x @ weight.T, softmax over all experts in
    float32, top-k, renormalized to sum to one when `renormalize`. The weights stay float32
    (Mixtral) or are cast to the input's dtype (`cast_weights`, the Qwen and OLMoE routers).

    forward(x [T, H]) -> (weights [T, K], ids [T, K]). The parameter is `weight` [E, H], as in
    the checkpoints."""

    def __init__(
        self, hidden_size: int, num_experts: int, top_k: int, renormalize: bool, cast_weights: bool
    ) -> None:
        super().__init__()
        if not 0 < top_k <= num_experts:
            raise ConfigError(f"num_experts_per_tok {top_k} must be in [1, num_experts {num_experts}]")
        self.weight = nn.Parameter(torch.empty(num_experts, hidden_size))
        self.top_k, self.renormalize, self.cast_weights = top_k, renormalize, cast_weights

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = torch.nn.functional.linear(x, self.weight)
        weights, ids = softmax_topk(logits, self.top_k, self.renormalize)
        if self.cast_weights:
            weights = weights.to(x.dtype)
        return weights, ids
