"""Tiny mixture-of-experts GGUF files, written the way llama.cpp's convert_hf_to_gguf.py writes
them, from the tiny random HF directories of tests.utils.tiny_models.

What llama.cpp's converter does, and this writer repeats:
- `general.architecture` is llama.cpp's arch name: "qwen2moe", "qwen3moe", "olmoe", "gpt-oss",
  and "llama" for Mixtral (llama.cpp runs Mixtral as a llama with experts).
- Hyperparameters under `{arch}.*`: block_count, context_length, embedding_length,
  feed_forward_length, attention.head_count(_kv), rope.freq_base, layer_norm_rms_epsilon,
  expert_count, expert_used_count, expert_feed_forward_length (Qwen MoE),
  expert_shared_feed_forward_length (Qwen2-MoE), attention.key/value_length when the config
  states head_dim; llama adds vocab_size and rope.dimension_count; gpt-oss adds
  attention.sliding_window, expert_feed_forward_length and its yarn rope.scaling.* keys.
- Tensors named by the gguf package's TensorNameMap (token_embd, blk.N.attn_q, ...); the
  per-expert matrices stacked into one 3-D tensor per layer: ffn_gate_exps / ffn_up_exps
  [E, I, H] and ffn_down_exps [E, H, I] (torch order; GGUF stores the dims reversed).
- gpt-oss's fused input-major experts are split and transposed (_split_gpt_oss_experts).
- For "llama" the q/k rows are permuted per head from HF's rotate-half layout to the
  interleaved pairs llama.cpp's rope uses: rows (head, half, i) -> (head, i, half).
- Qwen2-MoE's shared_expert_gate [1, H] is written as the 1-D [H] vector of the converter's
  squeezing versions (the published Qwen1.5-MoE GGUFs), or, with `squeeze=False`, as [1, H] the
  way converter versions without the squeeze write it.
- 1-D tensors and the router (ffn_gate_inp) stay F32; other matrices are F32 or F16.
- The BPE tokenizer as tokenizer.ggml.* ("gpt2" model, "gpt-2" pre-tokenizer, token list, token
  types with the special tokens as CONTROL, merges, bos/eos/pad ids) plus the chat template.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

#: HF model_type -> llama.cpp arch name.
GGUF_ARCH = {
    "mixtral": "llama",
    "qwen2_moe": "qwen2moe",
    "qwen3_moe": "qwen3moe",
    "olmoe": "olmoe",
    "gpt_oss": "gpt-oss",
}
#: Each arch's per-expert HF projection names, in ffn_gate / ffn_up / ffn_down order.
_EXPERT_PROJ = {
    "mixtral": ("w1", "w3", "w2"),
    "qwen2_moe": ("gate_proj", "up_proj", "down_proj"),
    "qwen3_moe": ("gate_proj", "up_proj", "down_proj"),
    "olmoe": ("gate_proj", "up_proj", "down_proj"),
}
_EXPERT = re.compile(r"model\.layers\.(\d+)\.(?:mlp|block_sparse_moe)\.experts\.(\d+)\.(\w+)\.weight")


def llama_permute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """HF rotate-half q/k rows [n_head * D, H] -> llama.cpp's interleaved rope layout."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _stack_experts(
    state: dict[str, torch.Tensor], model_type: str, num_layers: int
) -> dict[str, torch.Tensor]:
    """Per-expert HF matrices -> `model.layers.N.mlp.experts.{gate,up,down}_proj.weight` [E, ...],
    the names TensorNameMap maps to ffn_*_exps; the others pass through."""
    gate, up, down = _EXPERT_PROJ[model_type]
    out: dict[str, torch.Tensor] = {}
    experts: dict[tuple[int, str], dict[int, torch.Tensor]] = {}
    for name, t in state.items():
        if m := _EXPERT.fullmatch(name):
            experts.setdefault((int(m[1]), m[3]), {})[int(m[2])] = t
        else:
            out[name] = t
    for bid in range(num_layers):
        for hf_proj, stacked in ((gate, "gate_proj"), (up, "up_proj"), (down, "down_proj")):
            per_expert = experts.pop((bid, hf_proj), None)
            if per_expert is not None:
                stack = torch.stack([per_expert[e] for e in sorted(per_expert)])
                out[f"model.layers.{bid}.mlp.experts.{stacked}.weight"] = stack
    if experts:
        raise ValueError(f"unexpected expert tensors: {sorted(experts)}")
    return out


def _split_gpt_oss_experts(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """gpt-oss's fused, input-major experts (gate_up_proj [E, H, 2I] with gate/up interleaved along
    the last dim, down_proj [E, I, H], biases [E, 2I] / [E, H]) -> llama.cpp's separate output-major
    ffn_gate/up_exps [E, I, H] and ffn_down_exps [E, H, I] with their biases; sinks get `.weight`."""
    out: dict[str, torch.Tensor] = {}
    for name, t in state.items():
        base = name.rsplit(".", 1)[0]
        if name.endswith("mlp.experts.gate_up_proj"):
            t = t.transpose(-1, -2)
            out[f"{base}.gate_proj.weight"], out[f"{base}.up_proj.weight"] = t[:, ::2, :], t[:, 1::2, :]
        elif name.endswith("mlp.experts.gate_up_proj_bias"):
            out[f"{base}.gate_proj.bias"], out[f"{base}.up_proj.bias"] = t[..., ::2], t[..., 1::2]
        elif name.endswith("mlp.experts.down_proj"):
            out[f"{name}.weight"] = t.transpose(-1, -2)
        elif name.endswith("mlp.experts.down_proj_bias"):
            out[f"{base}.down_proj.bias"] = t
        elif name.endswith("self_attn.sinks"):
            out[f"{name}.weight"] = t
        else:
            out[name] = t
    return {k: v.contiguous() for k, v in out.items()}


def _add_tokenizer(writer: Any, hf_dir: Path, vocab_size: int, pre: str) -> None:
    import gguf
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(hf_dir)
    reverse = {i: t for t, i in tok.get_vocab().items()}
    added = tok.get_added_vocab()
    tokens: list[str] = []
    types: list[int] = []
    for i in range(vocab_size):
        if i not in reverse:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        else:
            token = reverse[i]
            tokens.append(token)
            if token in added:
                special = tok.added_tokens_decoder[i].special
                types.append(gguf.TokenType.CONTROL if special else gguf.TokenType.USER_DEFINED)
            else:
                types.append(gguf.TokenType.NORMAL)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    # merges, bos/eos/pad ids, add_bos/add_eos and the chat template, read from the HF files
    gguf.SpecialVocab(hf_dir, load_merges=True, n_vocab=len(tokens)).add_to_gguf(writer)


def write_tiny_gguf(
    hf_dir: str | Path, out_path: str | Path, *, f16: bool = False, squeeze: bool = True
) -> Path:
    """Write the HF directory `hf_dir` (a tiny MoE of tests.utils.tiny_models) as a llama.cpp-style
    GGUF file at `out_path`; matrices in F16 when `f16`, else F32; `squeeze`: see the module doc."""
    import gguf
    from safetensors.torch import load_file

    hf_dir, out_path = Path(hf_dir), Path(out_path)
    cfg: dict[str, Any] = json.loads((hf_dir / "config.json").read_text())
    model_type = cfg["model_type"]
    if model_type not in GGUF_ARCH:
        raise ValueError(f"no GGUF layout for {model_type!r}; known: {sorted(GGUF_ARCH)}")
    if cfg.get("mlp_only_layers"):
        raise ValueError("llama.cpp's qwen2moe has experts in every layer; build with mlp_only_layers=[]")
    arch_name = GGUF_ARCH[model_type]
    arch = next(a for a, n in gguf.MODEL_ARCH_NAMES.items() if n == arch_name)
    n_layers, n_head, n_kv = cfg["num_hidden_layers"], cfg["num_attention_heads"], cfg["num_key_value_heads"]

    writer = gguf.GGUFWriter(str(out_path), arch_name)
    writer.add_name(f"tiny-{model_type}")
    writer.add_block_count(n_layers)
    writer.add_context_length(cfg["max_position_embeddings"])
    writer.add_embedding_length(cfg["hidden_size"])
    writer.add_feed_forward_length(cfg["intermediate_size"])
    writer.add_head_count(n_head)
    writer.add_head_count_kv(n_kv)
    writer.add_rope_freq_base(cfg["rope_parameters"]["rope_theta"])
    writer.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    writer.add_expert_count(cfg.get("num_local_experts") or cfg["num_experts"])
    writer.add_expert_used_count(cfg["num_experts_per_tok"])
    if cfg.get("head_dim") is not None:
        writer.add_key_length(cfg["head_dim"])
        writer.add_value_length(cfg["head_dim"])
    if cfg.get("moe_intermediate_size") is not None:
        writer.add_expert_feed_forward_length(cfg["moe_intermediate_size"])
    if cfg.get("shared_expert_intermediate_size") is not None:
        writer.add_expert_shared_feed_forward_length(cfg["shared_expert_intermediate_size"])
    if arch_name == "llama":
        writer.add_vocab_size(cfg["vocab_size"])
        writer.add_rope_dimension_count(cfg["hidden_size"] // n_head)
    if arch_name == "gpt-oss":
        rope = cfg["rope_parameters"]
        writer.add_sliding_window(cfg["sliding_window"])
        writer.add_expert_feed_forward_length(cfg["intermediate_size"])
        writer.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        writer.add_rope_scaling_factor(rope["factor"])
        writer.add_rope_scaling_orig_ctx_len(rope["original_max_position_embeddings"])
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_F16 if f16 else gguf.LlamaFileType.ALL_F32)
    # the tiny tokenizer splits with GPT-2's regex: llama.cpp's pre-tokenizer name for it is "gpt-2"
    _add_tokenizer(writer, hf_dir, cfg["vocab_size"], "gpt-2")

    name_map = gguf.get_tensor_name_map(arch, n_layers)
    state = load_file(str(hf_dir / "model.safetensors"))
    if model_type == "gpt_oss":
        state = _split_gpt_oss_experts(state)
    else:
        state = _stack_experts(state, model_type, n_layers)
    for hf_name, t in state.items():
        t = t.float()
        if arch_name == "llama" and hf_name.endswith("self_attn.q_proj.weight"):
            t = llama_permute(t, n_head)
        elif arch_name == "llama" and hf_name.endswith("self_attn.k_proj.weight"):
            t = llama_permute(t, n_kv)
        if squeeze and hf_name.endswith("shared_expert_gate.weight"):
            t = t.squeeze(0)
        name = name_map.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise ValueError(f"no GGUF name for {hf_name}")
        keep_f32 = t.ndim == 1 or name.endswith("ffn_gate_inp.weight")
        data = t.numpy() if keep_f32 or not f16 else t.to(torch.float16).numpy()
        writer.add_tensor(name, np.ascontiguousarray(data))

    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out_path
