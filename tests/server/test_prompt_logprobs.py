"""Prompt logprobs through the server, with the official openai client, against HF transformers'
log_softmax of the prompt positions (float32): vLLM's `prompt_logprobs` extra, `echo` with
`logprobs` in completions (lm-eval-harness scores loglikelihood that way), and
`return_tokens_as_token_ids`. Every vLLM extra hallm does not implement is a 400 naming it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import torch

from tests.server.utils import API_KEY, MODEL_NAME, Server

PROMPT = "The quick brown fox jumps over the lazy dog"
TOL = 1e-4


@pytest.fixture(scope="module")
def client(server: Server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=API_KEY, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def hf_logprobs(tiny_llama: Path) -> Any:
    """prompt ids -> [len, V] float32 log_softmax of HF's logits (position p predicts token p+1)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()

    def run(ids: list[int]) -> torch.Tensor:
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits[0].float()
        return torch.log_softmax(logits, dim=-1)

    return run


def prompt_ids(server: Server, prompt: str) -> list[int]:
    resp = httpx.post(f"{server.url}/tokenize", json={"prompt": prompt}, timeout=30)
    return list(resp.json()["tokens"])


def test_echo_with_logprobs_scores_the_prompt(
    client: openai.OpenAI, server: Server, hf_logprobs: Any
) -> None:
    ids = prompt_ids(server, PROMPT)
    ref = hf_logprobs(ids)
    out = client.completions.create(
        model=MODEL_NAME,
        prompt=PROMPT,
        max_tokens=1,
        echo=True,
        logprobs=2,
        temperature=0,
        # candidates keyed by id: two tokens may decode to the same text
        extra_body={"return_tokens_as_token_ids": True},
    )
    lp = out.choices[0].logprobs
    assert lp is not None and lp.token_logprobs is not None and lp.top_logprobs is not None
    assert out.choices[0].text.startswith(PROMPT)
    # The prompt's tokens first (the first one unscored), then the generated token.
    assert len(lp.token_logprobs) == len(ids) + 1
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    for p in range(1, len(ids)):
        assert lp.token_logprobs[p] == pytest.approx(ref[p - 1, ids[p]].item(), abs=TOL)
        top = {int(k.removeprefix("token_id:")): v for k, v in lp.top_logprobs[p].items()}
        expected = ref[p - 1].topk(2)
        assert sorted(top) == sorted(expected.indices.tolist())
        assert [top[t] for t in expected.indices.tolist()] == pytest.approx(expected.values.tolist(), abs=TOL)
    assert lp.tokens == [f"token_id:{t}" for t in ids] + [lp.tokens[-1]]
    assert lp.text_offset is not None and lp.text_offset[0] == 0
    # Loglikelihood of a continuation, as lm-eval-harness computes it (max_tokens=1 with echo).
    assert lp.token_logprobs[len(ids)] == pytest.approx(ref[-1].max().item(), abs=TOL)


def test_echo_with_logprobs_streamed(client: openai.OpenAI, server: Server, hf_logprobs: Any) -> None:
    ids = prompt_ids(server, PROMPT)
    ref = hf_logprobs(ids)
    chunks = list(
        client.completions.create(
            model=MODEL_NAME, prompt=PROMPT, max_tokens=2, echo=True, logprobs=0, temperature=0, stream=True
        )
    )
    first = chunks[0].choices[0]
    assert first.text == PROMPT and first.logprobs is not None
    scores = first.logprobs.token_logprobs
    assert scores is not None and scores[0] is None and len(scores) == len(ids)
    assert scores[1:] == pytest.approx([ref[p - 1, ids[p]].item() for p in range(1, len(ids))], abs=TOL)


def test_prompt_logprobs_extra(client: openai.OpenAI, server: Server, hf_logprobs: Any) -> None:
    ids = prompt_ids(server, PROMPT)
    ref = hf_logprobs(ids)
    out = client.completions.create(
        model=MODEL_NAME, prompt=PROMPT, max_tokens=1, n=2, extra_body={"prompt_logprobs": 3}
    )
    for choice in out.choices:
        scored = choice.model_extra["prompt_logprobs"]
        assert len(scored) == len(ids) and scored[0] is None
        for p in range(1, len(ids)):
            pos = scored[p]
            assert pos[str(ids[p])]["logprob"] == pytest.approx(ref[p - 1, ids[p]].item(), abs=TOL)
            rank1 = next(v for v in pos.values() if v["rank"] == 1)
            assert rank1["logprob"] == pytest.approx(ref[p - 1].max().item(), abs=TOL)
            assert len({int(t) for t in pos}) >= 3
    # chat: at the response's top level, over the rendered conversation
    messages = [{"role": "user", "content": "hello there"}]
    chat_ids = list(
        httpx.post(f"{server.url}/tokenize", json={"messages": messages}, timeout=30).json()["tokens"]
    )
    chat_ref = hf_logprobs(chat_ids)
    chat = client.chat.completions.create(
        model=MODEL_NAME,
        messages=messages,
        max_tokens=1,
        extra_body={"prompt_logprobs": 0},  # type: ignore[arg-type]
    )
    scored = chat.model_extra["prompt_logprobs"]
    assert len(scored) == len(chat_ids)
    got = [scored[p][str(chat_ids[p])]["logprob"] for p in range(1, len(chat_ids))]
    assert got == pytest.approx(
        [chat_ref[p - 1, chat_ids[p]].item() for p in range(1, len(chat_ids))], abs=TOL
    )


def test_return_tokens_as_token_ids(client: openai.OpenAI) -> None:
    out = client.completions.create(
        model=MODEL_NAME,
        prompt=PROMPT,
        max_tokens=3,
        logprobs=1,
        temperature=0,
        extra_body={"return_tokens_as_token_ids": True, "ignore_eos": True},
    )
    lp = out.choices[0].logprobs
    assert lp is not None and lp.tokens is not None and len(lp.tokens) == 3
    assert all(t.startswith("token_id:") and t.split(":")[1].isdigit() for t in lp.tokens)
    chat = client.chat.completions.create(
        model=MODEL_NAME,
        messages=[{"role": "user", "content": "hi"}],
        max_tokens=2,
        logprobs=True,
        top_logprobs=2,
        extra_body={"return_tokens_as_token_ids": True, "ignore_eos": True},
    )
    content = chat.choices[0].logprobs.content  # type: ignore[union-attr]
    assert content and all(c.token.startswith("token_id:") for c in content)
    assert all(t.token.startswith("token_id:") for c in content for t in c.top_logprobs)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("use_beam_search", True),
        ("allowed_token_ids", [1, 2]),
        ("bad_words", ["x"]),
        ("logits_processors", ["a.b"]),
        ("priority", 3),
        ("cache_salt", "salt"),
        ("vllm_xargs", {"a": 1}),
        ("length_penalty", 0.5),
        ("kv_transfer_params", {"a": 1}),
        ("structural_tag", "{}"),
        ("audio", {"voice": "x"}),
        ("no_such_field", 1),
    ],
)
def test_unimplemented_extras_are_refused_by_name(server: Server, field: str, value: Any) -> None:
    for path, body in [
        ("/v1/completions", {"model": MODEL_NAME, "prompt": "hi", "max_tokens": 1}),
        ("/v1/chat/completions", {"model": MODEL_NAME, "messages": [{"role": "user", "content": "hi"}]}),
    ]:
        resp = httpx.post(
            f"{server.url}{path}", json={**body, field: value}, headers=server.headers, timeout=30
        )
        assert resp.status_code == 400, resp.text
        err = resp.json()["error"]
        assert err["param"] == field and field in err["message"]


def test_off_values_and_bookkeeping_are_accepted(server: Server) -> None:
    body = {
        "model": MODEL_NAME,
        "prompt": "hi",
        "max_tokens": 1,
        "use_beam_search": False,
        "priority": 0,
        "metadata": {"k": "v"},
        "store": False,
    }
    resp = httpx.post(f"{server.url}/v1/completions", json=body, headers=server.headers, timeout=30)
    assert resp.status_code == 200, resp.text


def test_truncate_prompt_tokens(client: openai.OpenAI, server: Server) -> None:
    ids = prompt_ids(server, PROMPT)
    out = client.completions.create(
        model=MODEL_NAME, prompt=PROMPT, max_tokens=1, extra_body={"truncate_prompt_tokens": 3}
    )
    assert out.usage is not None and out.usage.prompt_tokens == 3 < len(ids)


def test_continuous_usage_stats(client: openai.OpenAI) -> None:
    chunks = list(
        client.completions.create(
            model=MODEL_NAME,
            prompt=PROMPT,
            max_tokens=4,
            stream=True,
            stream_options={"include_usage": True, "continuous_usage_stats": True},  # type: ignore[typeddict-unknown-key]
            extra_body={"ignore_eos": True},
        )
    )
    counts = [c.usage.completion_tokens for c in chunks if c.usage is not None]
    assert len(counts) == len(chunks) and counts[-1] == 4 and counts == sorted(counts)


def test_tokenize_extras(server: Server) -> None:
    resp = httpx.post(
        f"{server.url}/tokenize", json={"prompt": "hello world", "return_token_strs": True}, timeout=30
    )
    body = resp.json()
    assert resp.status_code == 200 and len(body["token_strs"]) == body["count"]
    resp = httpx.post(
        f"{server.url}/tokenize", json={"prompt": "hi", "mm_processor_kwargs": {"a": 1}}, timeout=30
    )
    assert resp.status_code == 400 and resp.json()["error"]["param"] == "mm_processor_kwargs"
    resp = httpx.post(f"{server.url}/detokenize", json={"tokens": [5], "bogus": 1}, timeout=30)
    assert resp.status_code == 400 and resp.json()["error"]["param"] == "bogus"
