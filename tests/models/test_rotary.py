"""hallm's rotary embedding against HF's for every rope type transformers knows."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from hallm.core.layers.rotary import RotaryEmbedding
from hallm.platforms import ConfigError

HEAD = 32
ROPES: dict[str, dict[str, Any]] = {
    "default": {"rope_type": "default"},
    "linear": {"rope_type": "linear", "factor": 4.0},
    "dynamic": {"rope_type": "dynamic", "factor": 2.0},
    "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64},
    "llama3": {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 32,
    },
    "longrope": {
        "rope_type": "longrope",
        "short_factor": [1.0 + 0.1 * i for i in range(HEAD // 2)],
        "long_factor": [2.0 + 0.3 * i for i in range(HEAD // 2)],
        "original_max_position_embeddings": 64,
    },
}


def _config(rope: dict[str, Any]) -> Any:
    from transformers import LlamaConfig

    return LlamaConfig(
        hidden_size=4 * HEAD,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        rope_parameters={"rope_theta": 10000.0, **rope},
    )


def _hf_rotate(
    config: Any, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor
) -> tuple[torch.Tensor, ...]:
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

    rope = LlamaRotaryEmbedding(config)
    cos, sin = rope(q, positions[None])  # [1, T, D]
    # HF layout [B, H, T, D]; ours [T, H, D].
    q2, k2 = apply_rotary_pos_emb(q.transpose(0, 1)[None], k.transpose(0, 1)[None], cos, sin)
    return q2[0].transpose(0, 1), k2[0].transpose(0, 1)


@pytest.mark.parametrize("name", list(ROPES))
@pytest.mark.parametrize("max_pos", [40, 200], ids=["short", "long"])
def test_rotary_matches_hf(name: str, max_pos: int) -> None:
    config = _config(ROPES[name])
    gen = torch.Generator().manual_seed(0)
    positions = torch.randperm(max_pos, generator=gen)[:24]
    positions[0] = max_pos - 1  # HF picks longrope's factors from the largest position
    q = torch.randn(24, 4, HEAD, generator=gen)
    k = torch.randn(24, 2, HEAD, generator=gen)
    ours = RotaryEmbedding(config, HEAD)(positions, q, k)
    ref = _hf_rotate(config, positions, q, k)
    torch.testing.assert_close(ours[0], ref[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ours[1], ref[1], atol=1e-5, rtol=1e-5)


def test_partial_rotary_passes_the_rest_through() -> None:
    config = _config({"rope_type": "default", "partial_rotary_factor": 0.5})
    rope = RotaryEmbedding(config, HEAD)
    assert rope.rotary_dim == HEAD // 2
    q = torch.randn(5, 4, HEAD)
    out, _ = rope(torch.arange(5), q, q[:, :2])
    torch.testing.assert_close(out[..., HEAD // 2 :], q[..., HEAD // 2 :])


def test_unknown_rope_type_is_a_config_error() -> None:
    config = _config({"rope_type": "default"})
    config.rope_parameters = {"rope_type": "warp", "rope_theta": 10000.0}
    with pytest.raises(ConfigError, match="warp"):
        RotaryEmbedding(config, HEAD)
