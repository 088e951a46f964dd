"""The gated MLP of the Llama family: `down(act(gate(x)) * up(x))` with gate and up fused.

With SiLU the activation and product run as the op table's `silu_and_mul`; the projections are
`Linear` layers, whose kernels come from the table too.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from hallm.core.layers.linear import Linear
from hallm.core.layers.op_context import current_ops
from hallm.core.layers.parallel_linear import RowParallelLinear
from hallm.platforms import ConfigError


def _gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x, approximate="tanh")


#: HF `hidden_act` names -> torch functions (the gated MLPs we support).
ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "silu": F.silu,
    "swish": F.silu,
    "gelu": F.gelu,
    "gelu_pytorch_tanh": _gelu_tanh,
    "gelu_new": _gelu_tanh,
    "relu": F.relu,
}


def get_activation(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """The activation function for an HF `hidden_act` name; ConfigError if unknown."""
    try:
        return ACTIVATIONS[name]
    except KeyError:
        raise ConfigError(
            f"activation {name!r} is not supported by hallm's native models; supported: {sorted(ACTIVATIONS)}"
        ) from None


class GatedMLP(nn.Module):
    """x [T, hidden] -> [T, hidden]; one matmul computes gate and up ([T, 2*intermediate]).

    Under tensor parallelism `intermediate_size` is this rank's share: gate/up is column-parallel,
    down row-parallel (one all-reduce per block)."""

    def __init__(self, hidden_size: int, intermediate_size: int, hidden_act: str, bias: bool = False) -> None:
        super().__init__()
        self.intermediate_size = intermediate_size
        # Rows [0, I) are gate_proj, rows [I, 2I) are up_proj (see the models' load_weights).
        self.gate_up_proj = Linear(hidden_size, 2 * intermediate_size, bias=bias)
        self.down_proj = RowParallelLinear(intermediate_size, hidden_size, bias=bias)
        self.act = get_activation(hidden_act)
        self.silu = self.act is F.silu
        op = current_ops().silu_and_mul
        assert op is not None  # current_ops() fills every elementwise entry
        self._silu_and_mul = op

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate_up = self.gate_up_proj(x)
        if self.silu:
            return self.down_proj(self._silu_and_mul(gate_up))
        gate, up = gate_up.split(self.intermediate_size, dim=-1)
        return self.down_proj(self.act(gate) * up)
