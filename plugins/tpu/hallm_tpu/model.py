"""The Llama family (Llama, Mistral, Qwen2, Qwen3, SmolLM2) as one jit-able JAX function.

Weights come from the core's loader: the hallm torch model is built on the host once (HF
safetensors, GGUF through its converted cache, or dummy weights), and its parameters are stacked
per layer into device arrays (`JaxLlama.from_torch`), so the decoder runs as one `lax.scan` over
layers (one layer body to compile, whatever the depth). The layer math mirrors
`hallm.core.models.llama`: fused q/k/v and gate/up projections, optional biases, optional
per-head q/k RMSNorm (Qwen3), rope from the torch model's own inverse frequencies (every rope
type transformers knows), a per-layer sliding window.

Layout: every array is over the step's packed tokens (T = all requests' new tokens, padded to
a bucket), as in the core.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import numpy as np

from hallm.platforms import ConfigError
from hallm_tpu.attention import NO_WINDOW, write_kv

_ACTIVATIONS = ("silu", "swish", "gelu", "gelu_pytorch_tanh", "gelu_new", "relu")


@dataclasses.dataclass(frozen=True)
class ModelDims:
    """Static shapes and flags of a model (hashable: part of the compiled program)."""

    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_size: int
    intermediate_size: int
    vocab_size: int
    rms_eps: float
    activation: str
    qk_norm: bool
    attention_scaling: float  # multiplies rope's cos and sin
    long_rope_from: int | None  # longrope: positions from here use the long frequencies
    dtype: str  # "float32" | "bfloat16"

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_size

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_size


@dataclasses.dataclass
class StepInputs:
    """One step's device inputs, padded to a bucket (T tokens, R request rows).

    input_ids, positions, slots, token_req: int32 [T] (padding: id 0, position 0, slot past the
    cache, request row 0); block_tables int32 [R, W]; num_chunks int32 [] (key chunks to read);
    logits_rows int32 [R] (the token whose logits each sampled row needs); rope_long int32 [T]
    (longrope: 1 where the token takes the long factors, decided per request by the host).
    """

    input_ids: Any
    positions: Any
    slots: Any
    token_req: Any
    block_tables: Any
    num_chunks: Any
    logits_rows: Any
    rope_long: Any


@functools.cache
def register_step_inputs() -> None:
    """Make StepInputs a JAX pytree (once per process; jax is imported only here)."""
    import jax

    fields = [f.name for f in dataclasses.fields(StepInputs)]
    jax.tree_util.register_dataclass(StepInputs, data_fields=fields, meta_fields=[])


class JaxLlama:
    """Parameters (a pytree of device arrays) plus the static dims and per-layer windows."""

    def __init__(self, dims: ModelDims, params: dict[str, Any], windows: np.ndarray) -> None:
        self.dims = dims
        self.params = params
        self.windows = windows  # int32 [L]; NO_WINDOW where a layer attends to everything

    @classmethod
    def from_torch(cls, model: Any, hf_config: Any, dtype: str, device: Any) -> JaxLlama:
        """Convert a loaded hallm Llama-family torch model (hallm.core.models.llama)."""
        import jax
        import jax.numpy as jnp
        import torch

        inner = model.model
        attn = inner.layers[0].self_attn
        act = str(getattr(hf_config, "hidden_act", "silu"))
        if act not in _ACTIVATIONS:
            raise ConfigError(
                f"activation {act!r} is not supported on the tpu device; supported: {_ACTIVATIONS}"
            )
        rotary = inner.rotary_emb
        dims = ModelDims(
            num_layers=len(inner.layers),
            hidden_size=int(hf_config.hidden_size),
            num_heads=attn.num_heads,
            num_kv_heads=attn.num_kv_heads,
            head_size=attn.head_size,
            intermediate_size=inner.layers[0].mlp.intermediate_size,
            vocab_size=int(hf_config.vocab_size),
            rms_eps=float(inner.norm.eps),
            activation=act,
            qk_norm=attn.q_norm is not None,
            attention_scaling=float(rotary.attention_scaling),
            long_rope_from=rotary.original_max_position,
            dtype=dtype,
        )
        jdtype = jnp.bfloat16 if dtype == "bfloat16" else jnp.float32

        def arr(t: Any) -> np.ndarray:
            return t.detach().float().cpu().numpy()

        def stack(get: Any, transpose: bool = False) -> Any:
            mats = [arr(get(layer)) for layer in inner.layers]
            out = np.stack([m.T if transpose else m for m in mats])
            return jax.device_put(jnp.asarray(out, dtype=jdtype), device)

        def bias(get: Any, size: int) -> Any:
            """Stacked biases; zeros for a model without them (one code path for all)."""
            return stack(lambda layer: torch.zeros(size) if get(layer) is None else get(layer))

        layers: dict[str, Any] = {
            "ln1": stack(lambda m: m.input_layernorm.weight),
            "ln2": stack(lambda m: m.post_attention_layernorm.weight),
            "qkv_w": stack(lambda m: m.self_attn.qkv_proj.weight, transpose=True),  # [L, H, Q+2KV]
            "qkv_b": bias(lambda m: m.self_attn.qkv_proj.bias, dims.q_size + 2 * dims.kv_size),
            "o_w": stack(lambda m: m.self_attn.o_proj.weight, transpose=True),  # [L, Q, H]
            "o_b": bias(lambda m: m.self_attn.o_proj.bias, dims.hidden_size),
            "gate_up_w": stack(lambda m: m.mlp.gate_up_proj.weight, transpose=True),  # [L, H, 2I]
            "gate_up_b": bias(lambda m: m.mlp.gate_up_proj.bias, 2 * dims.intermediate_size),
            "down_w": stack(lambda m: m.mlp.down_proj.weight, transpose=True),  # [L, I, H]
            "down_b": bias(lambda m: m.mlp.down_proj.bias, dims.hidden_size),
        }
        if dims.qk_norm:
            layers["q_norm"] = stack(lambda m: m.self_attn.q_norm.weight)
            layers["k_norm"] = stack(lambda m: m.self_attn.k_norm.weight)
        embed = jax.device_put(jnp.asarray(arr(inner.embed_tokens.weight), dtype=jdtype), device)
        if model.tie_word_embeddings:
            lm_head = embed
        else:
            lm_head = jax.device_put(jnp.asarray(arr(model.lm_head.weight), dtype=jdtype), device)
        params: dict[str, Any] = {
            "embed": embed,  # [V, H]
            "lm_head": lm_head,  # [V, H]
            "norm": jax.device_put(jnp.asarray(arr(inner.norm.weight), dtype=jdtype), device),
            "inv_freq": jax.device_put(jnp.asarray(arr(rotary.inv_freq)), device),  # f32 [rotary/2]
            "long_inv_freq": jax.device_put(
                jnp.asarray(arr(getattr(rotary, "long_inv_freq", rotary.inv_freq))), device
            ),
            "layers": layers,
        }
        windows = np.array(
            [layer.self_attn.attn.sliding_window or NO_WINDOW for layer in inner.layers], dtype=np.int32
        )
        return cls(dims, params, windows)


def _rms_norm(x: Any, weight: Any, eps: float) -> Any:
    import jax.numpy as jnp

    xf = x.astype(jnp.float32)
    xf = xf * jnp.reciprocal(jnp.sqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps))
    return (xf * weight.astype(jnp.float32)).astype(x.dtype)


def _activation(name: str, x: Any) -> Any:
    import jax

    if name in ("silu", "swish"):
        return jax.nn.silu(x)
    if name == "gelu":
        return jax.nn.gelu(x, approximate=False)
    if name == "relu":
        return jax.nn.relu(x)
    return jax.nn.gelu(x, approximate=True)


def _rotate(x: Any, cos: Any, sin: Any) -> Any:
    """NeoX rotate-half over the first 2 * cos.shape[-1] dims of x [T, H, D]; cos/sin [T, 1, R/2]."""
    import jax.numpy as jnp

    half = cos.shape[-1]
    x1, x2 = x[..., :half], x[..., half : 2 * half]
    parts = [x1 * cos - x2 * sin, x2 * cos + x1 * sin]
    if 2 * half < x.shape[-1]:
        parts.append(x[..., 2 * half :])
    return jnp.concatenate(parts, axis=-1)


def forward(
    params: dict[str, Any],
    cache: Any,
    windows: Any,
    inputs: StepInputs,
    *,
    dims: ModelDims,
    attention: Any,
) -> tuple[Any, Any, Any]:
    """One step: (logits float32 [R, V] at `inputs.logits_rows`, final-normed hidden [T, H],
    the cache with this step's keys/values written). Traced under jit; `attention` is one of
    `hallm_tpu.attention.ATTENTION_IMPLS`."""
    import jax.numpy as jnp
    from jax import lax

    precision = lax.Precision.HIGHEST if dims.dtype == "float32" else None
    t = inputs.input_ids.shape[0]
    dtype = params["embed"].dtype
    hidden = params["embed"][inputs.input_ids]
    inv_freq = params["inv_freq"]
    if dims.long_rope_from is not None:
        # [T, D/2]: each token's own factors (a request's choice never depends on its batch)
        inv_freq = jnp.where(
            inputs.rope_long[:, None] != 0, params["long_inv_freq"][None, :], inv_freq[None, :]
        )
    else:
        inv_freq = inv_freq[None, :]
    freqs = inputs.positions.astype(jnp.float32)[:, None] * inv_freq
    cos = (jnp.cos(freqs) * dims.attention_scaling).astype(dtype)[:, None, :]
    sin = (jnp.sin(freqs) * dims.attention_scaling).astype(dtype)[:, None, :]
    scale = dims.head_size**-0.5

    def mm(x: Any, w: Any, b: Any) -> Any:
        return (jnp.dot(x, w, precision=precision) + b).astype(dtype)

    def layer(carry: Any, xs: Any) -> Any:
        h, residual, kv = carry
        w, index, window = xs
        residual = h + residual
        x = _rms_norm(residual, w["ln1"], dims.rms_eps)
        qkv = mm(x, w["qkv_w"], w["qkv_b"])
        q = qkv[:, : dims.q_size].reshape(t, dims.num_heads, dims.head_size)
        k = qkv[:, dims.q_size : dims.q_size + dims.kv_size].reshape(t, dims.num_kv_heads, dims.head_size)
        v = qkv[:, dims.q_size + dims.kv_size :].reshape(t, dims.num_kv_heads, dims.head_size)
        if dims.qk_norm:
            q = _rms_norm(q, w["q_norm"], dims.rms_eps)
            k = _rms_norm(k, w["k_norm"], dims.rms_eps)
        q, k = _rotate(q, cos, sin), _rotate(k, cos, sin)
        kv = write_kv(kv, index, k, v, inputs.slots)
        out = attention(
            q,
            kv,
            index,
            inputs.block_tables,
            inputs.token_req,
            inputs.positions,
            inputs.num_chunks,
            scale,
            window,
        )
        h = mm(out.reshape(t, dims.q_size), w["o_w"], w["o_b"])
        residual = h + residual
        x = _rms_norm(residual, w["ln2"], dims.rms_eps)
        gate_up = mm(x, w["gate_up_w"], w["gate_up_b"])
        gate, up = gate_up[:, : dims.intermediate_size], gate_up[:, dims.intermediate_size :]
        h = mm(_activation(dims.activation, gate) * up, w["down_w"], w["down_b"])
        return (h, residual, kv), None

    xs = (params["layers"], jnp.arange(dims.num_layers, dtype=jnp.int32), windows)
    (h, residual, cache), _ = lax.scan(layer, (hidden, jnp.zeros_like(hidden), cache), xs)
    final = _rms_norm(h + residual, params["norm"], dims.rms_eps)
    rows = final[inputs.logits_rows]
    logits = jnp.einsum("rh,vh->rv", rows, params["lm_head"], precision=precision).astype(jnp.float32)
    return logits, final, cache
