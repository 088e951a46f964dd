"""The op table: the operations inside a model that a device may run with its own kernels.

hallm's native models are built from the layers of `hallm.core.layers`. Each of those layers is
built with the op table of the platform that runs the model (`Platform.op_table()`) and calls
its entries; an entry left None runs the reference implementation in `hallm.ops.reference_ops`,
which every entry must match (the conformance kit checks each entry a platform provides against
it). Nothing is recognized by class name and no module is swapped after the model is built: a
device accelerates a model only through this table, its attention backends and its worker.
Models on the generic transformers path do not use the table; they run as transformers wrote
them. One entry is the sampler's rather than a layer's: `temperature_sample`, which the core's
Sampler calls (left None, the sampler runs its own torch code).

Entries are plain callables. Elementwise entries are called on every step. Entries that own
per-layer state (packed weights, scratch buffers) are factories: the layer calls them once,
after its weights are loaded, and keeps what they return; a factory returns None for a layer
it does not take, and the layer then runs the reference.

Shapes: T is the step's packed tokens (every request's new tokens, no batch axis); H the hidden
size; Hq and Hk the query and key/value heads; D the head size; I the MLP's intermediate size;
E the number of experts.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from torch import Tensor

    from hallm.platforms.attention import AttentionBackend

#: rms_norm(x [T, H], weight [H], eps, residual [T, H] | None) -> y [T, H], or, with a residual,
#: (y, x + residual): `y = weight * s / sqrt(mean(s^2) + eps)` with `s = x (+ residual)`. The
#: inputs are not modified.
RMSNormOp = Callable[["Tensor", "Tensor", float, "Tensor | None"], "Tensor | tuple[Tensor, Tensor]"]

#: rotary(positions [T] int, q [T, Hq, D], k [T, Hk, D], inv_freq float32 [D/2], scaling)
#: -> (q, k) rotated over the whole head in the NeoX layout (the first and second halves of a
#: head are the pair's two components), cos and sin scaled by `scaling`. May rotate q and k in
#: place and return them.
RotaryOp = Callable[["Tensor", "Tensor", "Tensor", "Tensor", float], "tuple[Tensor, Tensor]"]

#: silu_and_mul(x [T, 2I]) -> silu(x[:, :I]) * x[:, I:]  [T, I]: the gated MLP's activation.
SiluAndMulOp = Callable[["Tensor"], "Tensor"]

#: temperature_sample(logits [N, V] any float dtype, temperature float32 [N], seed int in
#: [0, 2^31)) -> [N] int64: one token per row drawn from softmax(logits / temperature); a row
#: whose temperature is 0 takes its argmax (the first index of the largest logit), exactly. A
#: -inf logit is never drawn. The draw is a function of (logits, temperature, seed): the same
#: seed gives the same tokens, and the sampler passes a fresh seed every step. The sampler calls
#: it for the rows of a step when no row uses top-k, top-p, min-p or a per-request seed (those
#: keep the sampler's own torch path), with the logits as the model produced them or after the
#: sampler's logit processing (bias, penalties, grammar masks) in float32. One pass over the
#: logits replaces the chain of full-vocabulary passes the torch path makes (scale, softmax,
#: noise, divide, argmax).
TemperatureSampleOp = Callable[["Tensor", "Tensor", int], "Tensor"]


@dataclasses.dataclass(frozen=True)
class SiluGLU:
    """The experts' activation on a gate/up pair: `silu(gate) * up` (Mixtral, Qwen-MoE, OLMoE)."""


@dataclasses.dataclass(frozen=True)
class ClampedSwiGLU:
    """gpt-oss's expert activation on a gate/up pair: `gate = min(gate, limit)`,
    `up = clamp(up, -limit, limit)`, `(up + 1) * gate * sigmoid(alpha * gate)`."""

    alpha: float
    limit: float


#: An expert MLP's activation, declared by the layer; every `fused_moe` entry takes each kind.
MoEActivation = SiluGLU | ClampedSwiGLU
SILU_GLU = SiluGLU()


class FusedMoEOp(Protocol):
    """fused_moe(hidden [T, H], topk_weights float [T, K], topk_ids int [T, K], w13 [E, 2I, H],
    w2 [E, H, I], *, activation, w13_bias [E, 2I] | None, w2_bias [E, H] | None) -> [T, H]: sum
    over each token's K chosen experts e of
    `topk_weights[t, k] * (w2[e] @ act(w13[e] @ hidden[t] + w13_bias[e]) + w2_bias[e])`, where
    `act` is `activation` on the gate (rows [0, I) of w13) and the up projection (rows [I, 2I));
    an absent bias is zero. Routing (which experts, their weights) is the model's: the layer
    computes it as its family's router does and passes the result. An expert no token chose need
    not be read. Under tensor parallelism w13/w13_bias/w2 hold this rank's slice of I and the
    output is this rank's partial sum (the layer passes w2_bias on one rank only)."""

    def __call__(
        self,
        hidden: Tensor,
        topk_weights: Tensor,
        topk_ids: Tensor,
        w13: Tensor,
        w2: Tensor,
        *,
        activation: MoEActivation = SILU_GLU,
        w13_bias: Tensor | None = None,
        w2_bias: Tensor | None = None,
    ) -> Tensor: ...


@dataclasses.dataclass(frozen=True)
class LinearWeights:
    """A linear layer's parameters: y = x @ weight.T + bias."""

    weight: Tensor  # [N, K]
    bias: Tensor | None  # [N]


class LinearKernel:
    """A linear layer prepared by a platform (what `OpTable.linear` returns).

    `__call__(x [..., K]) -> [..., N]`. A kernel that keeps the weight in its own layout (packed,
    transposed) sets `replaces_weight = True`: the layer then drops its [N, K] weight and always
    calls the kernel, so the weights take no more memory than before.
    """

    replaces_weight: bool = False

    def __call__(self, x: Tensor) -> Tensor:
        raise NotImplementedError


#: linear(LinearWeights) -> LinearKernel | None: called once per linear layer after loading.
LinearOp = Callable[[LinearWeights], "LinearKernel | None"]


class PagedAttentionLayer(Protocol):
    """What a decoder-stack kernel may use of a layer's paged attention (the core's Attention
    layer): its shape, the backend and KV cache bound to it, and the call itself."""

    num_heads: int
    num_kv_heads: int
    head_size: int
    scale: float
    sliding_window: int | None
    logits_soft_cap: float | None
    impl: AttentionBackend | None
    kv_cache: Tensor | None

    def __call__(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """q [T, Hq*D], k/v [T, Hk*D] -> [T, Hq*D]; writes k/v into the layer's cache."""
        ...


@dataclasses.dataclass(frozen=True)
class BoundLinear:
    """A linear layer's weights and the kernel the platform's `linear` entry prepared for it
    (the reference kernel where the entry is None or declined). `weights.weight` is None when
    the kernel replaced it."""

    weights: LinearWeights
    kernel: Callable[[Tensor], Tensor]


@dataclasses.dataclass(frozen=True)
class DecoderLayerWeights:
    """One Llama-family decoder layer, in the order it runs:

    h, residual = rms_norm(hidden, input_norm, residual)
    q, k, v     = split(qkv(h));  q, k = per-head rms_norm(q_norm / k_norm)  (when set)
    q, k        = rotary(positions, q, k)
    hidden      = o(attention(q, k, v))
    h, residual = rms_norm(hidden, post_norm, residual)
    hidden      = down(silu_and_mul(gate_up(h)))
    """

    input_norm: Tensor  # [H]
    input_eps: float
    qkv: BoundLinear  # rows [q (Hq*D) | k (Hk*D) | v (Hk*D)]
    q_norm: Tensor | None  # [D], per-head RMSNorm of q and k before rotary (Qwen3)
    k_norm: Tensor | None
    qk_eps: float
    attention: PagedAttentionLayer
    o: BoundLinear
    post_norm: Tensor  # [H]
    post_eps: float
    gate_up: BoundLinear  # rows [gate (I) | up (I)]
    down: BoundLinear
    num_heads: int
    num_kv_heads: int
    head_size: int
    intermediate_size: int


@dataclasses.dataclass(frozen=True)
class DecoderStackWeights:
    """A Llama-family model's decoder layers and final norm. The stack is offered to the table
    only when every layer has this shape, the activation is SiLU, and the rotary is the plain
    NeoX one over the whole head with fixed frequencies."""

    layers: tuple[DecoderLayerWeights, ...]
    final_norm: Tensor  # [H]
    final_eps: float
    inv_freq: Tensor  # float32 [D/2]
    rotary_scaling: float


class DecoderStackKernel(Protocol):
    """`(positions [T], hidden [T, H] embeddings) -> final-normed hidden [T, H]`, or None when
    the kernel does not take this step (the layers then run one op at a time). Decided from host
    values (shapes, dtypes), never from tensor contents, so the choice is graph-capturable."""

    def __call__(self, positions: Tensor, hidden: Tensor) -> Tensor | None: ...


#: llama_decoder_stack(DecoderStackWeights) -> DecoderStackKernel | None: called once after
#: loading; the kernel reads the attention layers' caches when called, so it may be built
#: before the KV cache exists.
DecoderStackOp = Callable[[DecoderStackWeights], "DecoderStackKernel | None"]


@dataclasses.dataclass(frozen=True)
class OpTable:
    """A platform's kernels for the ops of hallm's native layers; None: the reference."""

    rms_norm: RMSNormOp | None = None
    rotary: RotaryOp | None = None
    silu_and_mul: SiluAndMulOp | None = None
    linear: LinearOp | None = None
    llama_decoder_stack: DecoderStackOp | None = None
    fused_moe: FusedMoEOp | None = None
    temperature_sample: TemperatureSampleOp | None = None

    def provided(self) -> list[str]:
        """The names of the entries this table sets."""
        return [f.name for f in dataclasses.fields(self) if getattr(self, f.name) is not None]


#: Every entry of the table, in declaration order.
OP_NAMES: Sequence[str] = tuple(f.name for f in dataclasses.fields(OpTable))
