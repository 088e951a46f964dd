"""Pure-torch references of the op table's entries (`hallm.platforms.ops`), on any torch device.

The core's layers run these wherever a platform's table leaves an entry None, and the
conformance kit checks each entry a platform provides against them. `with_references(table)`
is the table the layers call: the platform's entries, and these in the gaps. `linear` here is
what a linear layer without a platform kernel runs (`F.linear`), and `llama_decoder_stack` the
chain the layers run one op at a time without a platform's stack kernel, for checking one.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch
import torch.nn.functional as F

from hallm.platforms.ops import (
    SILU_GLU,
    ClampedSwiGLU,
    DecoderStackWeights,
    LinearKernel,
    LinearWeights,
    MoEActivation,
    OpTable,
)


def rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """See `hallm.platforms.ops.RMSNormOp`; x [..., H]."""
    if residual is None:
        return F.rms_norm(x, weight.shape, weight, eps)
    x = x + residual
    return F.rms_norm(x, weight.shape, weight, eps), x


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the first `2 * cos.shape[-1]` dims of x [T, H, D] (NeoX "rotate half" layout).

    cos/sin [T, 1, rotary_dim/2]. Returns a new tensor; dims past rotary_dim pass through.
    """
    half = cos.shape[-1]
    x1, x2 = x[..., :half], x[..., half : 2 * half]
    out1 = x1 * cos - x2 * sin
    out2 = x2 * cos + x1 * sin
    if 2 * half == x.shape[-1]:
        return torch.cat((out1, out2), dim=-1)
    return torch.cat((out1, out2, x[..., 2 * half :]), dim=-1)


def rotary_cos_sin(
    positions: torch.Tensor, inv_freq: torch.Tensor, scaling: float, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """(cos, sin) [T, 1, len(inv_freq)] in `dtype`, computed in float32 and scaled."""
    freqs = positions.to(torch.float32)[:, None] * inv_freq[None, :]  # [T, rotary_dim/2]
    cos = (freqs.cos() * scaling).to(dtype)[:, None, :]
    sin = (freqs.sin() * scaling).to(dtype)[:, None, :]
    return cos, sin


def rotary(
    positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, inv_freq: torch.Tensor, scaling: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """See `hallm.platforms.ops.RotaryOp`."""
    cos, sin = rotary_cos_sin(positions, inv_freq, scaling, q.dtype)
    return apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """See `hallm.platforms.ops.SiluAndMulOp`."""
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up


class ReferenceLinear(LinearKernel):
    """`F.linear` over the layer's own weight."""

    def __init__(self, weights: LinearWeights) -> None:
        self.weight = weights.weight
        self.bias = weights.bias

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


def linear(weights: LinearWeights) -> LinearKernel:
    """See `hallm.platforms.ops.LinearOp`."""
    return ReferenceLinear(weights)


def moe_activation(gate_up: torch.Tensor, activation: MoEActivation) -> torch.Tensor:
    """An expert's activation: gate_up [N, 2I] (gate in the first half, up in the second) ->
    [N, I], op by op in gate_up's dtype as transformers computes it."""
    if isinstance(activation, ClampedSwiGLU):
        gate, up = gate_up.chunk(2, dim=-1)
        gate = gate.clamp(max=activation.limit)
        up = up.clamp(min=-activation.limit, max=activation.limit)
        return (up + 1) * (gate * torch.sigmoid(gate * activation.alpha))
    return silu_and_mul(gate_up)


def fused_moe(
    hidden: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    *,
    activation: MoEActivation = SILU_GLU,
    w13_bias: torch.Tensor | None = None,
    w2_bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """See `hallm.platforms.ops.FusedMoEOp`. Loops over the experts that any token chose, so an
    expert no token chose is never read."""
    out = torch.zeros(hidden.shape, dtype=torch.float32, device=hidden.device)
    for e in torch.unique(topk_ids).tolist():
        token, slot = torch.nonzero(topk_ids == e, as_tuple=True)
        b13 = None if w13_bias is None else w13_bias[e]
        b2 = None if w2_bias is None else w2_bias[e]
        y = F.linear(moe_activation(F.linear(hidden[token], w13[e], b13), activation), w2[e], b2)
        out.index_add_(0, token, y.float() * topk_weights[token, slot, None].float())
    return out.to(hidden.dtype)


def softmax_topk(
    router_logits: torch.Tensor, top_k: int, renormalize: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """The common MoE router: softmax over all experts (float32), the top_k, optionally
    renormalized to sum to one. router_logits [T, E] -> (weights float32 [T, K], ids [T, K])."""
    probs = torch.softmax(router_logits, dim=-1, dtype=torch.float32)
    weights, ids = probs.topk(top_k, dim=-1)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, ids


def temperature_sample(logits: torch.Tensor, temperature: torch.Tensor, seed: int) -> torch.Tensor:
    """See `hallm.platforms.ops.TemperatureSampleOp`: the Gumbel-max form of the exponential
    race, argmax(logits / T - log E) with E ~ Exp(1) from a CPU generator seeded with `seed`
    (so the draw does not depend on the device); greedy rows (T = 0) add no noise."""
    x = logits.float()
    greedy = (temperature == 0).unsqueeze(1)  # [N, 1]
    scale = torch.where(greedy, 1.0, temperature.unsqueeze(1).float())
    gen = torch.Generator().manual_seed(seed)
    noise = torch.empty(x.shape, dtype=torch.float32).exponential_(generator=gen)
    gumbel = noise.clamp_(min=torch.finfo(torch.float32).tiny).log_().neg_().to(x.device)
    return torch.where(greedy, x, x / scale + gumbel).argmax(dim=-1)


def llama_decoder_stack(
    stack: DecoderStackWeights, ops: OpTable | None = None
) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """The decoder stack as the layers run it one op at a time, with `ops` (default: these
    references): `kernel(positions, hidden) -> final-normed hidden`."""
    table = with_references(ops or OpTable())
    assert table.rms_norm is not None and table.rotary is not None and table.silu_and_mul is not None
    norm, rope, act = table.rms_norm, table.rotary, table.silu_and_mul

    def kernel(positions: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        t = hidden.shape[0]
        residual: torch.Tensor | None = None
        h: torch.Tensor
        for layer in stack.layers:
            if residual is None:
                residual = hidden
                h = norm(hidden, layer.input_norm, layer.input_eps, None)  # type: ignore[assignment]
            else:
                h, residual = norm(hidden, layer.input_norm, layer.input_eps, residual)  # type: ignore[misc]
            qs, kvs = layer.num_heads * layer.head_size, layer.num_kv_heads * layer.head_size
            q, k, v = layer.qkv.kernel(h).split([qs, kvs, kvs], dim=-1)
            q = q.reshape(t, layer.num_heads, layer.head_size)
            k = k.reshape(t, layer.num_kv_heads, layer.head_size)
            if layer.q_norm is not None and layer.k_norm is not None:
                q = norm(q, layer.q_norm, layer.qk_eps, None)  # type: ignore[assignment]
                k = norm(k, layer.k_norm, layer.qk_eps, None)  # type: ignore[assignment]
            q, k = rope(positions, q, k, stack.inv_freq, stack.rotary_scaling)
            out = layer.attention(q.reshape(t, qs), k.reshape(t, kvs), v)
            hidden = layer.o.kernel(out)
            h, residual = norm(hidden, layer.post_norm, layer.post_eps, residual)  # type: ignore[misc]
            hidden = layer.down.kernel(act(layer.gate_up.kernel(h)))
        final, _ = norm(hidden, stack.final_norm, stack.final_eps, residual)  # type: ignore[misc]
        return final

    return kernel


def with_references(table: OpTable) -> OpTable:
    """`table` with every elementwise entry it leaves None set to the reference. `linear` and
    the decoder stack stay as given: a linear layer without a kernel runs `F.linear`, and
    without a stack kernel the layers run one op at a time."""
    return dataclasses.replace(
        table,
        rms_norm=table.rms_norm or rms_norm,
        rotary=table.rotary or rotary,
        silu_and_mul=table.silu_and_mul or silu_and_mul,
        fused_moe=table.fused_moe or fused_moe,
    )
