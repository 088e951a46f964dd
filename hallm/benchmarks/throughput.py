"""Offline throughput with vLLM's `bench throughput` semantics, for hallm or HF transformers.

Prompts are random token ids (seeded) with lengths uniform in [L(1-r), L(1+r)]; every request
runs to its output length (`ignore_eos`). Throughput counts prefill: total tokens / wall time
of one call that runs every request.
"""

from __future__ import annotations

import dataclasses
import json
import random
import time
from typing import Any


@dataclasses.dataclass
class Workload:
    prompts: list[list[int]]
    output_lens: list[int]

    @property
    def num_prompt_tokens(self) -> int:
        return sum(len(p) for p in self.prompts)

    @property
    def num_output_tokens(self) -> int:
        return sum(self.output_lens)


def random_workload(
    num_prompts: int, input_len: int, output_len: int, range_ratio: float, vocab_size: int, seed: int = 0
) -> Workload:
    rng = random.Random(seed)

    def length(center: int) -> int:
        lo, hi = max(1, int(center * (1 - range_ratio))), max(1, int(center * (1 + range_ratio)))
        return rng.randint(lo, hi)

    # Avoid the lowest ids (special tokens in most vocabularies).
    low = min(100, vocab_size // 2)
    prompts = [[rng.randrange(low, vocab_size) for _ in range(length(input_len))] for _ in range(num_prompts)]
    return Workload(prompts, [length(output_len) for _ in range(num_prompts)])


@dataclasses.dataclass
class Result:
    backend: str
    elapsed_s: float
    num_requests: int
    prompt_tokens: int
    output_tokens: int

    @property
    def requests_per_s(self) -> float:
        return self.num_requests / self.elapsed_s

    @property
    def total_tokens_per_s(self) -> float:
        return (self.prompt_tokens + self.output_tokens) / self.elapsed_s

    @property
    def output_tokens_per_s(self) -> float:
        return self.output_tokens / self.elapsed_s

    def line(self) -> str:
        return (
            f"Throughput: {self.requests_per_s:.2f} requests/s, {self.total_tokens_per_s:.2f} total tokens/s, "
            f"{self.output_tokens_per_s:.2f} output tokens/s"
        )

    def to_json(self) -> str:
        d = dataclasses.asdict(self)
        d.update(
            requests_per_s=self.requests_per_s,
            total_tokens_per_s=self.total_tokens_per_s,
            output_tokens_per_s=self.output_tokens_per_s,
        )
        return json.dumps(d)


def run_hallm(engine_kwargs: dict[str, Any], workload: Workload, warmup: bool = True) -> Result:
    from hallm.core.sampling_params import SamplingParams
    from hallm.entrypoints.llm import LLM

    llm = LLM(**engine_kwargs)
    params = [
        SamplingParams(temperature=1.0, top_p=1.0, ignore_eos=True, max_tokens=n)
        for n in workload.output_lens
    ]
    if warmup:
        llm.generate([workload.prompts[0]], SamplingParams(max_tokens=4, ignore_eos=True), use_tqdm=False)
    llm.reset_prefix_cache()  # the warm-up must not hand the run a cached prefix
    start = time.perf_counter()
    outs = llm.generate([{"prompt_token_ids": p} for p in workload.prompts], params, use_tqdm=False)
    elapsed = time.perf_counter() - start
    produced = sum(len(o.outputs[0].token_ids) for o in outs)
    return Result("hallm", elapsed, len(outs), workload.num_prompt_tokens, produced)


def run_hf(
    model_dir: str, dtype: str, workload: Workload, max_batch_size: int, load_format: str = "auto"
) -> Result:
    """HF transformers `generate`, padded batches (vLLM's `--backend hf` baseline), greedy-free sampling."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
    if load_format == "dummy":
        config = AutoConfig.from_pretrained(model_dir)
        model = AutoModelForCausalLM.from_config(config, dtype=torch_dtype)
    else:
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch_dtype)
    model.eval()
    pad = model.config.pad_token_id
    if pad is None:
        pad = model.config.eos_token_id if isinstance(model.config.eos_token_id, int) else 0
    order = sorted(range(len(workload.prompts)), key=lambda i: len(workload.prompts[i]))

    def run_batch(idx: list[int]) -> int:
        prompts = [workload.prompts[i] for i in idx]
        width = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), width), pad, dtype=torch.long)
        mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for row, p in enumerate(prompts):  # left padding, as generate expects for decoder-only models
            ids[row, width - len(p) :] = torch.tensor(p)
            mask[row, width - len(p) :] = 1
        new = max(workload.output_lens[i] for i in idx)
        with torch.inference_mode():
            model.generate(
                input_ids=ids,
                attention_mask=mask,
                do_sample=True,
                max_new_tokens=new,
                min_new_tokens=new,
                pad_token_id=pad,
            )
        return sum(workload.output_lens[i] for i in idx)

    run_batch(order[:1])  # warm-up
    start = time.perf_counter()
    produced = 0
    for b in range(0, len(order), max_batch_size):
        produced += run_batch(order[b : b + max_batch_size])
    elapsed = time.perf_counter() - start
    return Result("hf", elapsed, len(order), workload.num_prompt_tokens, produced)
