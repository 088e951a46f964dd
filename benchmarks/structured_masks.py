"""Host time of one step's grammar masks, in isolation: one row after another
(`grammar_bitmask`, what the sampler uses) vs a batch's rows computed together on llguidance's
thread pool (`LLExecutor`), for B requests constrained by the same JSON schema, each at a
different point of it. The pool wins here on a many-core host; inside the engine it loses
(benchmarks/structured_output.py on the GPU host, benchmarks/results/gpu.md), which is why the
sampler goes row by row.

    python benchmarks/structured_masks.py [--tokenizer DIR] [--batch 1 8 32] [--steps 64]

The tokenizer defaults to the default model's (SmolLM2-135M, 49,152 tokens). Both variants see
the same matchers at the same states; the masks are checked equal before timing.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.structured_output import SCHEMA


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokenizer", default=None, help="a model directory (default: the default model's)")
    p.add_argument("--batch", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--steps", type=int, default=64)
    args = p.parse_args()

    import llguidance
    from transformers import AutoTokenizer

    from hallm.core.structured_output import GrammarMatcher, StructuredOutputsParams, grammar_bitmask

    source = args.tokenizer
    if source is None:
        from hallm.core.model_loader import resolve_model

        source = str(resolve_model(None).tokenizer_dir)
    tok = AutoTokenizer.from_pretrained(source)
    spec = dataclasses.replace(StructuredOutputsParams(json=SCHEMA), tokenizer=source)
    text = '{"id": 7, "values": [' + ", ".join(str(i % 10) for i in range(80))
    ids = tok.encode(text, add_special_tokens=False)
    eos = frozenset({tok.eos_token_id})
    print(f"tokenizer {source} ({len(tok)} tokens), torch threads {torch.get_num_threads()}")
    print(f"{'batch':>5} {'row by row us':>14} {'together us':>12} {'ratio':>6}")
    for batch in args.batch:
        # Request i has consumed i tokens more than request 0: every row at its own state.
        outputs = [ids[: 4 + i] for i in range(batch)]
        matchers = [GrammarMatcher(spec) for _ in range(batch)]
        for m, out in zip(matchers, outputs, strict=True):
            m.catch_up(out)
        pool = llguidance.LLExecutor()
        alone = grammar_bitmask(matchers, outputs, [eos] * batch)
        words = alone.shape[1]
        together = torch.zeros_like(alone)

        rows = [(m.matcher, i) for i, m in enumerate(matchers)]
        pool.unsafe_compute_mask_ptr(rows, together.data_ptr(), words * 4, batch)
        if not torch.equal(together, alone):
            raise SystemExit("the two variants computed different masks")
        times: dict[str, list[float]] = {"rows": [], "together": []}
        for _ in range(args.steps):
            t0 = time.perf_counter()
            grammar_bitmask(matchers, outputs, [eos] * batch)
            t1 = time.perf_counter()
            pool.unsafe_compute_mask_ptr(rows, together.data_ptr(), words * 4, batch)
            t2 = time.perf_counter()
            times["rows"].append((t1 - t0) * 1e6)
            times["together"].append((t2 - t1) * 1e6)
        rows, both = statistics.median(times["rows"]), statistics.median(times["together"])
        print(f"{batch:>5} {rows:>14.1f} {both:>12.1f} {rows / both:>6.2f}")


if __name__ == "__main__":
    main()
