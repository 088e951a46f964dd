"""Tensor parallelism on two GPUs (NCCL): TP=2 on the mp and ray executors against HF transformers
on the same weights (tests/gpu/run_all.sh tp-greedy; skipped without two NVIDIA GPUs); and the mp
executor's one-rank path on one GPU (a worker process, async scheduling across the process
boundary, step graphs in the worker).

The check is the single-GPU greedy test's (tests/gpu/test_engine_gpu.py): HF teacher-forces
prompt + hallm's tokens once, and every token hallm chose must be HF's argmax up to the bf16 tie
tolerance; hallm's logprobs are compared too. Models: Qwen2.5-0.5B's shapes (14 query heads, 2
KV heads: the KV heads split one per rank) and Llama-3.1-8B's layer shapes on 4 layers (32 query
heads, 8 KV heads), random bf16 weights.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.gpu.test_engine_gpu import _assert_within, _check_against_hf, _free, _generate, _prompts, _record

NEEDS_GPUS = {
    n: pytest.mark.skipif(
        torch.version.cuda is None or torch.cuda.device_count() < n, reason=f"needs {n} NVIDIA GPU(s)"
    )
    for n in (1, 2)
}


def _model_dir(name: str, tmp: Path) -> Path:
    import transformers as tf

    from benchmarks.gpu_common import model_config
    from tests.utils.tiny_models import build_tokenizer

    config = model_config(name)
    if name == "llama-3.1-8b":
        config.num_hidden_layers = 4  # the layer's shapes are what TP splits; 4 keep the test short
    config.bos_token_id, config.eos_token_id = 0, 1
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = tf.AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(tmp)
    build_tokenizer().save_pretrained(tmp)
    del model
    torch.cuda.empty_cache()
    return tmp


def _greedy_matches_hf(
    tmp_path: Path, name: str, label: str, seed: int, expect_async: bool = False, **llm_args: object
) -> None:
    """hallm's greedy tokens of random prompts on `name`'s random bf16 model against HF."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from hallm.entrypoints.llm import LLM

    path = _model_dir(name, tmp_path / name)
    vocab = int(AutoConfig.from_pretrained(path).vocab_size)
    prompts = _prompts(8, vocab, 20, 600, seed=seed)
    llm = LLM(
        model=str(path), device="cuda", dtype="bfloat16", max_model_len=2048, gpu_memory_utilization=0.5,
        **llm_args,  # type: ignore[arg-type]
    )  # fmt: skip
    if expect_async:
        assert llm.engine.async_scheduling, "async scheduling is the CUDA default and mp supports it"
    outputs = _generate(llm, prompts, 32)
    _free(llm)
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).cuda().eval()
    summary = _check_against_hf(hf, prompts, outputs)
    _record(label, summary)
    _assert_within(summary, tie_tol=0.15, lp_tol=0.15)


@NEEDS_GPUS[2]
@pytest.mark.parametrize("executor", ["mp", "ray"])
@pytest.mark.parametrize("name", ["qwen2.5-0.5b", "llama-3.1-8b"])
def test_tp2_bf16_greedy_matches_hf(tmp_path: Path, name: str, executor: str) -> None:
    if executor == "ray":
        pytest.importorskip("ray")
    _greedy_matches_hf(
        tmp_path,
        name,
        f"tp2-{executor}-{name}-bf16",
        2,
        tensor_parallel_size=2,
        distributed_executor_backend=executor,
    )


@NEEDS_GPUS[1]
def test_mp_one_rank_async_bf16_greedy_matches_hf(tmp_path: Path) -> None:
    _greedy_matches_hf(
        tmp_path,
        "qwen2.5-0.5b",
        "mp1-async-qwen2.5-0.5b-bf16",
        3,
        expect_async=True,
        tensor_parallel_size=1,
        distributed_executor_backend="mp",
    )
