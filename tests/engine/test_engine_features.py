"""Engine features end to end on a tiny model: stop strings (also streamed, and on the token that
also hits max_tokens), stop_token_ids, EOS, min_tokens, ignore_eos, max_tokens, n > 1, abort,
chat templates and prefix caching.

A logit_bias of +100 on one token makes greedy decoding repeat that token, which makes the text
predictable: " capital capital capital ...".
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from hallm.core.outputs import RequestOutput
from hallm.core.sampling_params import SamplingParams
from hallm.entrypoints.llm import LLM

CAPITAL = 319  # " capital" in the tiny BPE tokenizer
EOS = 1


@pytest.fixture(scope="module")
def model_dir(tiny_model_dir: Callable[[str], Path]) -> str:
    return str(tiny_model_dir("llama"))


def make_llm(model_dir: str, **kwargs: Any) -> LLM:
    kwargs = {"block_size": 4, "num_gpu_blocks_override": 64, **kwargs}
    return LLM(model=model_dir, device="cpu", dtype="float32", **kwargs)


@pytest.fixture(scope="module")
def llm(model_dir: str) -> LLM:
    return make_llm(model_dir)


def forced(token: int, **kwargs: Any) -> SamplingParams:
    """Greedy decoding that always picks `token` (unless min_tokens masks it)."""
    kwargs.setdefault("max_tokens", 5)
    return SamplingParams(temperature=0.0, logit_bias={token: 100.0}, **kwargs)


def one(llm: LLM, params: SamplingParams, prompt: str = "Hello, world!") -> RequestOutput:
    (out,) = llm.generate(prompt, params, use_tqdm=False)
    assert out.finished
    return out


def test_tokenizer_assumptions(llm: LLM) -> None:
    tokenizer = llm.get_tokenizer()
    assert tokenizer.decode([CAPITAL]) == " capital"
    assert tokenizer.eos_token_id == EOS
    out = one(llm, forced(CAPITAL, max_tokens=3, ignore_eos=True)).outputs[0]
    assert out.token_ids == [CAPITAL] * 3 and out.text == " capital" * 3


# ---- stop strings ---------------------------------------------------------------------------


def test_stop_string_truncates_text(llm: LLM) -> None:
    # "l c" spans the boundary of the first two tokens.
    out = one(llm, forced(CAPITAL, stop=["zzz", "l c"])).outputs[0]
    assert out.text == " capita"
    assert out.finish_reason == "stop" and out.stop_reason == "l c"
    assert out.token_ids == [CAPITAL, CAPITAL]


def test_stop_string_included_when_asked(llm: LLM) -> None:
    out = one(llm, forced(CAPITAL, stop="l c", include_stop_str_in_output=True)).outputs[0]
    assert out.text == " capital c"
    assert out.finish_reason == "stop" and out.stop_reason == "l c"


def test_stop_string_on_the_last_allowed_token_is_a_stop(llm: LLM) -> None:
    # The token that completes the stop string is also the max_tokens-th: the text is cut at the
    # stop string, so the request finished because of it (vLLM reports "stop").
    out = one(llm, forced(CAPITAL, stop="l c", max_tokens=2)).outputs[0]
    assert out.text == " capita"
    assert out.finish_reason == "stop" and out.stop_reason == "l c"
    out = one(llm, forced(CAPITAL, stop=" capital", max_tokens=1)).outputs[0]
    assert out.text == "" and out.finish_reason == "stop" and out.stop_reason == " capital"


def test_stop_string_waits_for_min_tokens(llm: LLM) -> None:
    out = one(llm, forced(CAPITAL, stop=" capital", min_tokens=2)).outputs[0]
    assert out.token_ids == [CAPITAL] * 3
    assert out.text == " capital capital" and out.finish_reason == "stop"


def test_streamed_text_holds_back_a_possible_stop_string(llm: LLM) -> None:
    engine = llm.engine
    engine.add_request("stream", "Hello, world!", forced(CAPITAL, stop="l c"))
    texts = []
    while engine.has_unfinished_requests():
        texts += [o.outputs[0].text for o in engine.step() if o.request_id == "stream"]
    assert texts[-1] == " capita"
    for text in texts:  # never shows text that the stop string cuts away later
        assert texts[-1].startswith(text), texts
    assert texts[0] == " capit"  # " capital" minus len("l c") - 1 held-back characters


# ---- token-level stops ----------------------------------------------------------------------


def test_stop_token_ids(llm: LLM) -> None:
    out = one(llm, forced(CAPITAL, stop_token_ids=[7, CAPITAL])).outputs[0]
    assert out.token_ids == [CAPITAL]
    assert out.finish_reason == "stop" and out.stop_reason == CAPITAL
    assert out.text == ""  # the stop token's text is left out...
    out = one(llm, forced(CAPITAL, stop_token_ids=[CAPITAL], include_stop_str_in_output=True)).outputs[0]
    assert out.text == " capital"  # ...unless asked for


def test_eos_stops_and_its_text_is_left_out(llm: LLM) -> None:
    for skip_special_tokens in (True, False):
        out = one(llm, forced(EOS, skip_special_tokens=skip_special_tokens)).outputs[0]
        assert out.token_ids == [EOS]
        assert out.finish_reason == "stop" and out.stop_reason is None
        assert out.text == ""


def test_ignore_eos_runs_to_max_tokens(llm: LLM) -> None:
    out = one(llm, forced(EOS, ignore_eos=True, max_tokens=4)).outputs[0]
    assert out.token_ids == [EOS] * 4 and out.finish_reason == "length" and out.stop_reason is None


def test_min_tokens_masks_eos_and_stop_tokens(llm: LLM) -> None:
    out = one(llm, forced(EOS, min_tokens=3, max_tokens=8)).outputs[0]
    assert len(out.token_ids) == 4 and EOS not in out.token_ids[:3] and out.token_ids[3] == EOS
    assert out.finish_reason == "stop"
    out = one(llm, forced(CAPITAL, stop_token_ids=[CAPITAL], min_tokens=2, max_tokens=8)).outputs[0]
    assert len(out.token_ids) == 3 and CAPITAL not in out.token_ids[:2] and out.token_ids[2] == CAPITAL
    assert out.finish_reason == "stop" and out.stop_reason == CAPITAL


def test_max_tokens_finishes_with_length(llm: LLM) -> None:
    prompts = ["Hello", "The capital of France is"]
    for out in llm.generate(
        prompts, SamplingParams(temperature=0.0, max_tokens=7, ignore_eos=True), use_tqdm=False
    ):
        assert len(out.outputs[0].token_ids) == 7
        assert out.outputs[0].finish_reason == "length" and out.outputs[0].stop_reason is None


def test_no_max_tokens_runs_to_the_context_limit(model_dir: str) -> None:
    llm = make_llm(model_dir, max_model_len=32)
    params = SamplingParams(temperature=0.0, max_tokens=None, ignore_eos=True)
    (out,) = llm.generate({"prompt_token_ids": list(range(3, 29))}, params, use_tqdm=False)
    assert len(out.outputs[0].token_ids) == 32 - 26 and out.outputs[0].finish_reason == "length"


# ---- n > 1 ----------------------------------------------------------------------------------


def test_n_random_samples_are_distinct(llm: LLM) -> None:
    params = SamplingParams(n=4, temperature=1.0, max_tokens=12, ignore_eos=True)
    (out,) = llm.generate("Once upon a time", params, use_tqdm=False)
    assert [c.index for c in out.outputs] == [0, 1, 2, 3]
    assert len({tuple(c.token_ids) for c in out.outputs}) == 4
    assert all(len(c.token_ids) == 12 and c.finish_reason == "length" for c in out.outputs)


def test_n_greedy_samples_are_equal(llm: LLM) -> None:
    (single,) = llm.generate(
        "Once upon a time", SamplingParams(temperature=0.0, max_tokens=8), use_tqdm=False
    )
    (out,) = llm.generate(
        "Once upon a time", SamplingParams(n=3, temperature=0.0, max_tokens=8), use_tqdm=False
    )
    assert len(out.outputs) == 3
    for c in out.outputs:
        assert c.token_ids == single.outputs[0].token_ids and c.text == single.outputs[0].text


# ---- abort ----------------------------------------------------------------------------------


def test_abort_frees_blocks_and_others_finish(model_dir: str) -> None:
    llm = make_llm(model_dir, max_num_seqs=3)
    engine = llm.engine
    pool = engine.scheduler.kv.pool
    start = pool.num_free_blocks
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    (expected,) = llm.generate("Hello, world!", params, use_tqdm=False)
    for rid in ("a", "b", "c", "d"):  # d waits: max_num_seqs=3
        engine.add_request(rid, "Hello, world!", params)
    engine.add_request("e", "The quick brown fox", SamplingParams(n=2, temperature=1.0, max_tokens=12))
    for _ in range(3):
        engine.step()
    assert engine.scheduler.kv.block_ids("b"), "b should hold blocks before the abort"
    aborted = engine.abort_request(["b", "d", "e"])
    assert {o.request_id for o in aborted} == {"b", "d", "e"}
    for out in aborted:
        assert out.finished and all(c.finish_reason == "abort" for c in out.outputs)
    assert not any(engine.scheduler.kv.block_ids(r) for r in ("b", "d", "e#0", "e#1"))
    finished: dict[str, RequestOutput] = {}
    while engine.has_unfinished_requests():
        finished.update((o.request_id, o) for o in engine.step() if o.finished)
    assert set(finished) == {"a", "c"}
    for out in finished.values():
        assert out.outputs[0].token_ids == expected.outputs[0].token_ids
    assert pool.num_free_blocks == start
    assert engine.abort_request("no-such-request") == []


# ---- chat and prefix caching ----------------------------------------------------------------


def test_chat_uses_the_chat_template(llm: LLM) -> None:
    conversations = [
        [{"role": "user", "content": "Hello, world!"}],
        [
            {"role": "system", "content": "You like lists."},
            {"role": "user", "content": "apples, oranges"},
        ],
    ]
    params = SamplingParams(temperature=0.0, max_tokens=6)
    outs = llm.chat(conversations, params, use_tqdm=False)
    tokenizer = llm.get_tokenizer()
    for conv, out in zip(conversations, outs, strict=True):
        text = tokenizer.apply_chat_template(conv, add_generation_prompt=True, tokenize=False)
        assert text.startswith("<|bos|>") and text.endswith("<|assistant|>")
        assert out.prompt_token_ids == tokenizer(text, add_special_tokens=False).input_ids
        (plain,) = llm.generate({"prompt_token_ids": out.prompt_token_ids}, params, use_tqdm=False)
        assert out.outputs[0].token_ids == plain.outputs[0].token_ids
    (single,) = llm.chat(conversations[0], params, use_tqdm=False)  # one conversation, not a list
    assert single.prompt_token_ids == outs[0].prompt_token_ids


def test_prefix_caching_on_and_off_agree(model_dir: str) -> None:
    shared = "The capital of France is Paris. The capital of Italy is Rome. "
    prompts = [shared + tail for tail in ("The capital of Spain", "Hello, world!", "one, two, three")]
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    results = {}
    for caching in (False, True):
        llm = make_llm(model_dir, enable_prefix_caching=caching)
        first = llm.generate(prompts, params, use_tqdm=False)
        second = llm.generate(prompts, params, use_tqdm=False)  # the prefix is cached now
        assert [o.outputs[0].token_ids for o in first] == [o.outputs[0].token_ids for o in second]
        cached = [o.num_cached_tokens for o in second]
        assert all(c > 0 for c in cached) if caching else not any(cached)
        results[caching] = [o.outputs[0].token_ids for o in first]
    assert results[True] == results[False]
