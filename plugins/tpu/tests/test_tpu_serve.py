"""`hallm serve --device tpu` (JAX CPU backend) answers the official openai client: completions
and chat, streamed and not; the streamed text equals the full answer, which equals HF's greedy
continuation."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import openai
import pytest
import torch

from tests.server.utils import MODEL_NAME, Server, start_server

PROMPT = "The capital of France is"
NEW_TOKENS = 8


@pytest.fixture(scope="module")
def server(tiny_model: Callable[[str], Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    # The helper starts `--device cpu ...`; the later flags win (argparse keeps the last).
    # JAX_PLATFORMS=cpu reaches the server through the environment (conftest).
    srv = start_server(
        tiny_model("llama"),
        tmp_path_factory.mktemp("tpu-server"),
        "--device",
        "tpu",
        # The shapes of test_tpu_vs_hf's tiny llama: its compiled programs are shared.
        "--block-size",
        "4",
        "--num-gpu-blocks-override",
        "64",
        "--max-num-batched-tokens",
        "16",
        "--max-num-seqs",
        "4",
    )
    yield srv
    srv.terminate(timeout=30)


def test_openai_client(server: Server, tiny_model: Callable[[str], Path]) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    assert "compiled" in server.log() and "step programs" in server.log()
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=120)
    kwargs = dict(
        model=MODEL_NAME, prompt=PROMPT, temperature=0, max_tokens=NEW_TOKENS, extra_body={"ignore_eos": True}
    )
    full = client.completions.create(**kwargs)
    assert full.usage is not None and full.usage.completion_tokens == NEW_TOKENS
    streamed = "".join(c.choices[0].text for c in client.completions.create(stream=True, **kwargs))
    assert streamed == full.choices[0].text

    path = tiny_model("llama")
    tok = AutoTokenizer.from_pretrained(path)
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    ids = torch.tensor([tok(PROMPT).input_ids])
    ref = hf.generate(ids, do_sample=False, max_new_tokens=NEW_TOKENS, pad_token_id=tok.pad_token_id)
    assert full.choices[0].text == tok.decode(ref[0, ids.shape[1] :])

    messages = [{"role": "user", "content": "Name a color."}]
    chat_kwargs = dict(model=MODEL_NAME, messages=messages, temperature=0, max_tokens=NEW_TOKENS)
    chat = client.chat.completions.create(**chat_kwargs)
    chunks = client.chat.completions.create(stream=True, **chat_kwargs)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == chat.choices[0].message.content and text
