"""lm-eval-harness-style loglikelihood scoring through `hallm serve`, checked against HF transformers.

Multiple-choice items (made here: arithmetic and capitals, so nothing is downloaded) are scored
the way lm-eval-harness's `local-completions` model does: (context, continuation) is tokenized as
context then the rest of context + continuation, sent as token ids with `echo=True`,
`logprobs=1`, `max_tokens=1`, and the continuation's loglikelihood is the sum of the echoed
logprobs of its tokens; the choice with the highest loglikelihood is the answer. The same sums are computed with HF transformers on the same
weights (float32 log_softmax); the script prints both accuracies, how many answers agree, and the
largest loglikelihood difference.

    python benchmarks/loglikelihood.py [--model M] [--items 300] [--base-url URL]

Without --base-url it starts `hallm serve` on the model (default: hallm's default SmolLM2) on
the CPU and stops it at the end.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import random
import socket
import subprocess
import sys
import time
from typing import Any

import httpx

CAPITALS = {
    "France": "Paris", "Italy": "Rome", "Spain": "Madrid", "Germany": "Berlin", "Japan": "Tokyo",
    "Egypt": "Cairo", "Canada": "Ottawa", "Russia": "Moscow", "China": "Beijing", "Greece": "Athens",
    "Portugal": "Lisbon", "Austria": "Vienna", "Norway": "Oslo", "Sweden": "Stockholm", "Peru": "Lima",
    "Kenya": "Nairobi", "Poland": "Warsaw", "Ireland": "Dublin", "Cuba": "Havana", "Chile": "Santiago",
}  # fmt: skip


def make_items(n: int, seed: int = 0) -> list[tuple[str, list[str], int]]:
    """(context, continuations, index of the right one)."""
    rng = random.Random(seed)
    items: list[tuple[str, list[str], int]] = []
    countries = list(CAPITALS)
    while len(items) < n:
        if len(items) % 3 == 2:
            country = rng.choice(countries)
            wrong = rng.sample([c for c in CAPITALS.values() if c != CAPITALS[country]], 3)
            options = [CAPITALS[country], *wrong]
            context = f"The capital of {country} is"
        else:
            a, b = rng.randint(1, 50), rng.randint(1, 50)
            options = [str(a + b), str(a + b + rng.randint(1, 9)), str(abs(a - b)), str(a * b)]
            context = f"Question: What is {a} plus {b}?\nAnswer:"
        options = list(dict.fromkeys(options))
        rng.shuffle(options)
        right = options.index(CAPITALS[country] if "capital" in context else str(a + b))
        items.append((context, [" " + o for o in options], right))
    return items


def encode_pair(tokenizer: Any, context: str, continuation: str) -> tuple[list[int], int]:
    """(prompt ids, number of continuation tokens at its end), as lm-eval-harness splits them."""
    whole = list(tokenizer.encode(context + continuation))
    n_context = len(tokenizer.encode(context))
    return whole, len(whole) - n_context


def served_loglikelihood(client: httpx.Client, model: str, ids: list[int], n: int) -> float:
    body = {"model": model, "prompt": ids, "echo": True, "logprobs": 1, "max_tokens": 1}
    resp = client.post("/v1/completions", json=body)
    resp.raise_for_status()
    scores = resp.json()["choices"][0]["logprobs"]["token_logprobs"]
    return float(sum(scores[len(ids) - n : len(ids)]))


def hf_loglikelihoods(model_dir: str, encoded: list[tuple[list[int], int]]) -> list[float]:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    out = []
    for ids, n in encoded:
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits[0].float()
        logprobs = torch.log_softmax(logits, dim=-1)
        out.append(sum(logprobs[p - 1, ids[p]].item() for p in range(len(ids) - n, len(ids))))
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="model directory or GGUF (default: hallm's default)")
    parser.add_argument("--items", type=int, default=300)
    parser.add_argument("--base-url", default=None, help="a running server (default: start one)")
    args = parser.parse_args()

    from hallm.core.model_loader import load_tokenizer
    from hallm.core.model_loader.resolve import resolve_model

    resolved = resolve_model(args.model)
    tokenizer = load_tokenizer(resolved.tokenizer_dir)
    items = make_items(args.items)
    encoded = [encode_pair(tokenizer, c, o) for c, options, _ in items for o in options]

    server = None
    base_url = args.base_url
    if base_url is None:
        port = free_port()
        cmd = [sys.executable, "-m", "hallm.entrypoints.cli", "serve", *([args.model] if args.model else [])]
        cmd += ["--device", "cpu", "--dtype", "float32", "--port", str(port), "--served-model-name", "m"]
        server = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        base_url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 600
        while True:
            try:
                if httpx.get(f"{base_url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if server.poll() is not None or time.monotonic() > deadline:
                raise SystemExit("the server did not start")
            time.sleep(1)
    try:
        with httpx.Client(base_url=base_url, timeout=300) as client:
            model = client.get("/v1/models").json()["data"][0]["id"]
            start = time.perf_counter()
            with concurrent.futures.ThreadPoolExecutor(16) as pool:
                served = list(pool.map(lambda e: served_loglikelihood(client, model, *e), encoded))
            served_s = time.perf_counter() - start
    finally:
        if server is not None:
            server.terminate()
            server.wait(60)
    reference = hf_loglikelihoods(resolved.model_dir, encoded)

    def answers(scores: list[float]) -> list[int]:
        out, k = [], 0
        for _, options, _ in items:
            chunk = scores[k : k + len(options)]
            out.append(max(range(len(options)), key=chunk.__getitem__))
            k += len(options)
        return out

    served_answers, hf_answers = answers(served), answers(reference)
    right = [r for _, _, r in items]
    acc = lambda a: sum(x == y for x, y in zip(a, right, strict=True)) / len(items)  # noqa: E731
    agree = sum(x == y for x, y in zip(served_answers, hf_answers, strict=True))
    diff = max(abs(a - b) for a, b in zip(served, reference, strict=True))
    print(
        f"model={resolved.display_name} items={len(items)} requests={len(encoded)} ({served_s:.1f} s served)"
    )
    print(f"accuracy: hallm serve {acc(served_answers):.3f}, HF transformers {acc(hf_answers):.3f}")
    print(f"same answer on {agree}/{len(items)} items; largest loglikelihood difference {diff:.2e}")
    return 0 if agree == len(items) else 1


if __name__ == "__main__":
    raise SystemExit(main())
