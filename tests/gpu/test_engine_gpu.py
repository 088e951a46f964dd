"""hallm's engine on the GPU (CUDA platform, Triton attention, CUDA graphs) against HF
transformers on the same weights on the same GPU (tests/gpu/run_all.sh; skipped without a GPU).

Greedy tokens are checked by teacher forcing: HF runs once over prompt + hallm's tokens, and
every token hallm chose must be HF's argmax at that position, up to a tie tolerance (random
weights give near-flat distributions; float32 1e-3, bf16 wider). hallm's reported logprob of each
token is compared with HF's too. Tiny models of every native arch run in float32, eager, with
hallm-cuda's CUDA graphs (`graphs`: decode steps and steps with prompt tokens), and with decode
graphs alone (`decode-graphs`, benchmarks/variants.py's A/B) (gpt-oss: attention sinks in the
Triton kernel, its experts in the Triton fused MoE); a Qwen2.5-0.5B-shaped random model runs in
bf16. Tiny MoE models (Mixtral, Qwen2-MoE,
Qwen3-MoE, OLMoE) go through the Triton fused MoE op, a long-RoPE model through per-request
rope factors.
"""

from __future__ import annotations

import gc
import json
import os
import random
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.skipif(
    torch.version.cuda is None or not torch.cuda.is_available(), reason="needs an NVIDIA GPU"
)

RESULTS = Path(os.environ.get("HALLM_GPU_RESULTS", "benchmarks/results/raw"))
TINY_ARCHS = (
    *("llama", "llama3", "mistral", "qwen2", "qwen3", "gemma2", "gpt_oss"),
    # the fused MoE op (Triton) in every MoE layer; long-RoPE factors chosen per request
    "mixtral",
    "qwen2_moe",
    "qwen3_moe",
    "olmoe",
    "phi3_longrope",
)
#: Archs run eagerly or may be: gemma2 through transformers' modules (the generic path).
GENERIC_ARCHS = ("gemma2",)


def _prompts(n: int, vocab: int, lo: int, hi: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, vocab) for _ in range(rng.randint(lo, hi))] for _ in range(n)]


def _runner(llm):  # type: ignore[no-untyped-def]
    executor = getattr(llm.engine, "executor", None)
    worker = getattr(executor, "worker", None)
    return getattr(worker, "runner", None)


def _capture_decode_graphs_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make this process's CUDA platform capture graphs of decode steps alone (as
    benchmarks/variants.py `decode-graphs` does)."""
    from hallm_cuda.platform import CudaPlatform

    from hallm.ops.torch_graphs import capture_step_graphs

    def step_graphs(self, target):  # type: ignore[no-untyped-def]
        return capture_step_graphs(target)

    monkeypatch.setattr(CudaPlatform, "step_graphs", step_graphs)


def _count_mixed_replays(runner) -> list[int]:  # type: ignore[no-untyped-def]
    """[n]: how many steps with prompt tokens replayed a mixed graph from here on."""
    count = [0]
    mixed = getattr(getattr(runner, "graphs", None), "mixed", None)
    if mixed is not None:
        replay = mixed.replay

        def counted(*args):  # type: ignore[no-untyped-def]
            count[0] += 1
            return replay(*args)

        mixed.replay = counted
    return count


def _generate(llm, prompts: list[list[int]], max_tokens: int) -> list[tuple[list[int], list[float]]]:  # type: ignore[no-untyped-def]
    from hallm.core.sampling_params import SamplingParams

    params = SamplingParams(
        temperature=0.0, max_tokens=max_tokens, ignore_eos=True, logprobs=0, detokenize=False
    )
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    result = []
    for o in outs:
        c = o.outputs[0]
        lps = [float(entry[tok].logprob) for tok, entry in zip(c.token_ids, c.logprobs or [], strict=False)]
        result.append((list(c.token_ids), lps))
    return result


@torch.no_grad()
def _teacher_forced(hf, prompt: list[int], tokens: list[int]) -> tuple[torch.Tensor, torch.Tensor]:  # type: ignore[no-untyped-def]
    """(gap, logprob) per generated token: HF's max logit minus the chosen token's, and HF's logprob."""
    ids = torch.tensor([prompt + tokens[:-1]], device="cuda")
    logits = hf(input_ids=ids, use_cache=False).logits[0, len(prompt) - 1 :].float()
    chosen = torch.tensor(tokens, device="cuda")[:, None]
    gap = logits.max(dim=-1).values - logits.gather(1, chosen)[:, 0]
    logprob = torch.log_softmax(logits, dim=-1).gather(1, chosen)[:, 0]
    return gap.cpu(), logprob.cpu()


def _check_against_hf(hf, prompts, outputs) -> dict:  # type: ignore[no-untyped-def]
    exact = total = 0
    worst_gap = worst_lp = 0.0
    for prompt, (tokens, lps) in zip(prompts, outputs, strict=True):
        gap, hf_lp = _teacher_forced(hf, prompt, tokens)
        exact += int((gap == 0).sum())
        total += len(tokens)
        worst_gap = max(worst_gap, float(gap.max()))
        if lps:
            worst_lp = max(worst_lp, float((torch.tensor(lps) - hf_lp).abs().max()))
    return {"tokens": total, "exact_argmax": exact, "max_gap": worst_gap, "max_logprob_diff": worst_lp}


def _assert_within(summary: dict, tie_tol: float, lp_tol: float) -> None:
    assert summary["max_gap"] <= tie_tol, summary
    assert summary["max_logprob_diff"] <= lp_tol, summary


def _record(name: str, data: dict) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    with open(RESULTS / "greedy.jsonl", "a") as f:
        f.write(json.dumps({"case": name, **data}) + "\n")


def _free(llm) -> None:  # type: ignore[no-untyped-def]
    shutdown = getattr(llm.engine, "shutdown", None)
    if shutdown is not None:
        shutdown()
    del llm
    gc.collect()
    torch.cuda.empty_cache()


@pytest.mark.parametrize("mode", ["graphs", "decode-graphs", "eager"])
@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_tiny_float32_greedy_matches_hf(
    tiny_model_dir: Callable[[str], Path], arch: str, mode: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from transformers import AutoModelForCausalLM

    from hallm.entrypoints.llm import LLM

    eager = mode == "eager"
    if mode == "decode-graphs":
        _capture_decode_graphs_only(monkeypatch)
    path = tiny_model_dir(arch)
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).cuda().eval()
    llm = LLM(
        model=str(path),
        device="cuda",
        dtype="float32",
        max_model_len=256,
        enforce_eager=eager,
        block_size=16,
        max_num_batched_tokens=256,
        gpu_memory_utilization=0.5,
    )
    runner = _runner(llm)
    graphs_on = runner is not None and runner.graphs is not None
    # Batches of several sizes (graph buckets 1, 8, 16 padded); prompts cross page boundaries.
    # Long-RoPE: every prompt is past the original context (16), so that HF's one teacher-forced
    # forward uses the long factors throughout as hallm does (a request crossing the context while
    # generating keeps its short-factor keys in hallm; HF would recompute them: see
    # tests/models/test_longrope_vs_hf.py, which checks that case against HF's generate).
    prompts = _prompts(13, 512, 17 if "longrope" in arch else 5, 120, seed=1)
    mixed_replays = _count_mixed_replays(runner)
    outputs = _generate(llm, prompts, 40)
    outputs += _generate(llm, prompts[:1], 40)
    summary = _check_against_hf(hf, prompts + prompts[:1], outputs)
    summary["graphs"] = graphs_on
    summary["mixed_graph_replays"] = mixed_replays[0]
    _record(f"tiny-{arch}-fp32-{mode}", summary)
    _free(llm)
    _assert_within(summary, tie_tol=1e-3, lp_tol=1e-3)
    if not eager and arch not in GENERIC_ARCHS:
        assert graphs_on, "CUDA graphs were not captured"
    if mode == "graphs" and arch not in GENERIC_ARCHS:
        assert mixed_replays[0] > 0, "no step with prompt tokens replayed a mixed CUDA graph"


def _qwen_05b_dir(tmp: Path) -> Path:
    """A Qwen2.5-0.5B-shaped checkpoint with random bf16 weights (HF's own init), saved as HF."""
    import transformers as tf

    from tests.utils.tiny_models import build_tokenizer

    config = tf.Qwen2Config(
        vocab_size=151936,
        hidden_size=896,
        intermediate_size=4864,
        num_hidden_layers=24,
        num_attention_heads=14,
        num_key_value_heads=2,
        max_position_embeddings=32768,
        rope_theta=1000000.0,
        rms_norm_eps=1e-6,
        tie_word_embeddings=True,
        bos_token_id=0,
        eos_token_id=1,
        dtype="bfloat16",
    )
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = tf.AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(tmp)
    build_tokenizer().save_pretrained(tmp)
    return tmp


@pytest.mark.parametrize("mode", ["graphs", "decode-graphs"])
def test_qwen_05b_shaped_bf16_greedy_matches_hf(
    tmp_path: Path, mode: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from transformers import AutoModelForCausalLM

    from hallm.entrypoints.llm import LLM

    if mode == "decode-graphs":
        _capture_decode_graphs_only(monkeypatch)

    path = _qwen_05b_dir(tmp_path / "qwen05b")
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).cuda().eval()
    llm = LLM(
        model=str(path), device="cuda", dtype="bfloat16", max_model_len=2048, gpu_memory_utilization=0.5
    )
    runner = _runner(llm)
    prompts = _prompts(8, 151936, 20, 600, seed=2)
    mixed_replays = _count_mixed_replays(runner)
    outputs = _generate(llm, prompts, 32)
    # bf16: hallm and HF round differently (fused qkv, Triton vs SDPA), so near-ties may flip.
    summary = _check_against_hf(hf, prompts, outputs)
    summary["graphs"] = runner is not None and runner.graphs is not None
    summary["mixed_graph_replays"] = mixed_replays[0]
    _record(f"qwen2.5-0.5b-shaped-bf16-{mode}", summary)
    _free(llm)
    _assert_within(summary, tie_tol=0.15, lp_tol=0.15)
    assert summary["graphs"], "CUDA graphs were not captured"
    if mode == "graphs":
        assert mixed_replays[0] > 0, "no step with prompt tokens replayed a mixed CUDA graph"
