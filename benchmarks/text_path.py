"""The host cost of text out: per-token incremental detokenization vs deferred decoding.

Feeds the same token ids, one token per sequence per step as the engine does, to the detokenizer
of each sequence, the way the offline API reads them (text read once, when the sequence ends):
  per-token   IncrementalDetokenizer decoding every token as it arrives (a streaming consumer)
  deferred    IncrementalDetokenizer(deferred=True): ids recorded, one decode per sequence
and prints microseconds per output token and the ratio, alternating the two for --rounds rounds.
The ids are the default model's tokenizer encoding real text (English, code, CJK, emoji), so
multi-byte characters split over tokens are in the stream.

    .venv/bin/python benchmarks/text_path.py [--tokenizer DIR] [--seqs 256] [--tokens 128]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

TEXT = (
    "The quick brown fox jumps over the lazy dog. def add(a, b):\n    return a + b\n"
    "日本語のテキストと絵文字 🚀🎉 mixed with English prose, numbers 3.14159 and symbols {}[]<>. "
)


def _tokenizer(path: str | None):  # type: ignore[no-untyped-def]
    from hallm.core.model_loader import default_model_path, load_tokenizer

    return load_tokenizer(path or default_model_path())


def run(tokenizer, seqs: int, tokens: int, deferred: bool) -> float:  # type: ignore[no-untyped-def]
    """Seconds for `seqs` sequences of `tokens` tokens, stepped together, each read at its end."""
    from hallm.core.detokenizer import IncrementalDetokenizer
    from hallm.core.sampling_params import SamplingParams

    ids = tokenizer.encode(TEXT * (tokens // 20 + 2), add_special_tokens=False)
    prompt = ids[:32]
    params = SamplingParams(max_tokens=tokens)
    start = time.perf_counter()
    detoks = [IncrementalDetokenizer(tokenizer, prompt, params, deferred=deferred) for _ in range(seqs)]
    for t in range(tokens):
        for s, d in enumerate(detoks):
            d.update([ids[(s + t) % len(ids)]])
    texts = []
    for d in detoks:
        d.flush()
        texts.append(d.output_text)
    elapsed = time.perf_counter() - start
    assert all(texts)
    return elapsed


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokenizer", help="tokenizer directory or GGUF (default: the default model's)")
    p.add_argument("--seqs", type=int, default=256)
    p.add_argument("--tokens", type=int, default=128)
    p.add_argument("--rounds", type=int, default=5)
    args = p.parse_args()
    tok = _tokenizer(args.tokenizer)
    n = args.seqs * args.tokens
    times: dict[str, list[float]] = {"per-token": [], "deferred": []}
    run(tok, 8, 16, False)  # warm-up
    for _ in range(args.rounds):
        for label in times:
            times[label].append(run(tok, args.seqs, args.tokens, label == "deferred"))
    print(
        f"{type(tok).__name__}, {args.seqs} sequences x {args.tokens} tokens, {args.rounds} rounds (median, min-max):"
    )
    med = {k: statistics.median(v) for k, v in times.items()}
    for label, ts in times.items():
        print(
            f"  {label:10} {1e6 * med[label] / n:7.2f} us/token  ({1e6 * min(ts) / n:.2f}-{1e6 * max(ts) / n:.2f})"
        )
    print(f"  deferred / per-token = {med['deferred'] / med['per-token']:.3f}")


if __name__ == "__main__":
    main()
