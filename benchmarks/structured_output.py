"""Structured-output overhead: output tokens/s with and without a JSON schema, offline, at batch
1 and 32 (CPU by default). Every request generates exactly --max-tokens tokens (ignore_eos; the
schema has an unbounded string so the grammar never ends first), so the two runs do the same
model work and the difference is the grammar's: mask computation, copy and application.

    python benchmarks/structured_output.py [--model DIR_OR_GGUF] [--device cpu] [--max-tokens 64]

Without --model it builds the tests' tiny random llama (no download), where the model is cheap
and the grammar's share is the largest.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

SCHEMA = {
    "type": "object",
    "properties": {"id": {"type": "integer"}, "tags": {"type": "array", "items": {"type": "string"}}},
    "required": ["id", "tags"],
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 32])
    args = parser.parse_args()

    from hallm.core.sampling_params import SamplingParams
    from hallm.entrypoints.llm import LLM

    model = args.model
    if model is None:
        sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
        from tests.utils.tiny_models import build_tiny_model

        model = str(build_tiny_model("llama", Path(tempfile.mkdtemp())))
    llm = LLM(model, device=args.device, max_model_len=args.max_tokens + 16, max_num_seqs=max(args.batch))
    print(f"model={model} device={args.device} max_tokens={args.max_tokens}")
    print(f"{'batch':>5} {'plain tok/s':>12} {'schema tok/s':>13} {'ratio':>6}")
    for batch in args.batch:
        rates = []
        for schema in (None, SCHEMA):
            params = [
                SamplingParams(
                    temperature=1.0,
                    seed=i,
                    max_tokens=args.max_tokens,
                    ignore_eos=True,
                    structured_outputs=None if schema is None else {"json": schema},
                )
                for i in range(batch)
            ]
            llm.generate(["warm up"] * batch, params, use_tqdm=False)  # compile caches, first steps
            start = time.perf_counter()
            outs = llm.generate(["Give me a record:"] * batch, params, use_tqdm=False)
            elapsed = time.perf_counter() - start
            rates.append(sum(len(o.outputs[0].token_ids) for o in outs) / elapsed)
        print(f"{batch:>5} {rates[0]:>12.1f} {rates[1]:>13.1f} {rates[1] / rates[0]:>6.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
