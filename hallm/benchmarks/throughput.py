"""Offline throughput with vLLM's `bench throughput` semantics, for hallm or HF transformers.

Prompts are random token ids (seeded) with lengths uniform in [L(1-r), L(1+r)]; every request
runs to its output length (`ignore_eos`). Throughput counts prefill: total tokens / wall time
of one call that runs every request.

A fresh process's first run pays for compilation and warm-up inside its timing, so hallm runs
the workload `num_iters_warmup` times first (reported apart, as the first-run cost a user
sees), then `num_iters` timed times and reports the median and the min-max spread. With
`compare_detokenize` the timed runs alternate text out (detokenized) and token ids out, same
engine and requests, so their ratio is the cost of the text path.
"""

from __future__ import annotations

import dataclasses
import json
import random
import statistics
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
    """One measured configuration. elapsed_s: the median of `runs_s` (the timed runs);
    first_run_s: the first run of the fresh process (warm-up included), when one was made."""

    backend: str
    elapsed_s: float
    num_requests: int
    prompt_tokens: int
    output_tokens: int
    runs_s: list[float] = dataclasses.field(default_factory=list)
    first_run_s: float | None = None
    label: str = ""

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
        head = f"Throughput{f' ({self.label})' if self.label else ''}: "
        text = (
            f"{head}{self.requests_per_s:.2f} requests/s, {self.total_tokens_per_s:.2f} total tokens/s, "
            f"{self.output_tokens_per_s:.2f} output tokens/s"
        )
        if len(self.runs_s) > 1:
            lo, hi = self.num_requests / max(self.runs_s), self.num_requests / min(self.runs_s)
            text += f" (median of {len(self.runs_s)} runs; requests/s min-max {lo:.2f}-{hi:.2f})"
        if self.first_run_s is not None:
            text += (
                f"\nFirst run of the process{f' ({self.label})' if self.label else ''}: {self.first_run_s:.2f} s "
                f"vs steady-state median {self.elapsed_s:.2f} s (warm-up cost "
                f"{self.first_run_s - self.elapsed_s:+.2f} s)"
            )
        return text

    def to_json(self) -> str:
        d = dataclasses.asdict(self)
        d.update(
            requests_per_s=self.requests_per_s,
            total_tokens_per_s=self.total_tokens_per_s,
            output_tokens_per_s=self.output_tokens_per_s,
        )
        return json.dumps(d)


def run_hallm(
    engine_kwargs: dict[str, Any],
    workload: Workload,
    warmup: bool = True,
    num_iters: int = 1,
    num_iters_warmup: int = 0,
    compare_detokenize: bool = False,
) -> list[Result]:
    """Results of hallm on `workload`: one, or (compare_detokenize) text out then ids out.

    warmup: a 4-token request before anything is timed (when num_iters_warmup is 0).
    num_iters_warmup: full runs of the workload first, timed apart as the first-run cost.
    """
    from hallm.core.sampling_params import SamplingParams
    from hallm.entrypoints.llm import LLM

    if num_iters < 1 or num_iters_warmup < 0:
        raise ValueError(
            f"num_iters must be >= 1 and num_iters_warmup >= 0, got {num_iters}, {num_iters_warmup}"
        )
    llm = LLM(**engine_kwargs)
    variants = [("text", True), ("ids", False)] if compare_detokenize else [("", True)]
    if compare_detokenize and llm.get_tokenizer() is None:
        raise ValueError("compare_detokenize needs a tokenizer: leave out --skip-tokenizer-init")
    prompts = [{"prompt_token_ids": p} for p in workload.prompts]

    def one_run(detokenize: bool) -> tuple[float, int]:
        params = [
            SamplingParams(temperature=1.0, top_p=1.0, ignore_eos=True, max_tokens=n, detokenize=detokenize)
            for n in workload.output_lens
        ]
        llm.reset_prefix_cache()  # no run may hand the next one a cached prefix
        start = time.perf_counter()
        outs = llm.generate(prompts, params, use_tqdm=False)
        elapsed = time.perf_counter() - start
        return elapsed, sum(len(o.outputs[0].token_ids) for o in outs)

    if warmup and not num_iters_warmup:
        llm.generate([workload.prompts[0]], SamplingParams(max_tokens=4, ignore_eos=True), use_tqdm=False)
    first: dict[str, float] = {}
    for i in range(num_iters_warmup):
        for label, detok in variants:
            elapsed, _ = one_run(detok)
            if i == 0:
                first[label] = elapsed
    runs: dict[str, list[float]] = {label: [] for label, _ in variants}
    produced: dict[str, int] = {}
    for _ in range(num_iters):
        for label, detok in variants:  # interleaved: drift in the machine hits both alike
            elapsed, produced[label] = one_run(detok)
            runs[label].append(elapsed)
    return [
        Result(
            "hallm",
            statistics.median(runs[label]),
            len(workload.prompts),
            workload.num_prompt_tokens,
            produced[label],
            runs_s=runs[label],
            first_run_s=first.get(label),
            label=label,
        )
        for label, _ in variants
    ]


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
