"""Structured output offline: the token-bitmask application against a per-token reference, and
`SamplingParams(structured_outputs=...)` on a tiny random model at temperature 1, with and
without async scheduling, through preemption (a small KV pool) and n>1: outputs always match."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import torch

from hallm.core.sampling_params import SamplingParams
from hallm.core.structured_output import StructuredOutputsParams, apply_token_bitmask
from hallm.entrypoints.llm import LLM

SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "id": {"type": "integer", "minimum": 0, "maximum": 999},
        "tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "maxItems": 3},
        "note": {"type": ["string", "null"], "maxLength": 4},
    },
    "required": ["id", "tags", "note"],
    "additionalProperties": False,
}
REGEX = r"(yes|no)-[0-9]{2}"


def reference_mask(logits: torch.Tensor, rows: list[int], bitmask: torch.Tensor) -> torch.Tensor:
    out = logits.clone()
    for j, r in enumerate(rows):
        for t in range(logits.shape[1]):
            word, bit = divmod(t, 32)
            allowed = word < bitmask.shape[1] and (int(bitmask[j, word]) >> bit) & 1
            if not allowed:
                out[r, t] = float("-inf")
    return out


@pytest.mark.parametrize(("vocab", "words"), [(70, 3), (100, 3), (64, 2)])
@pytest.mark.parametrize("rows", [None, [1, 3]])
def test_apply_token_bitmask_matches_reference(vocab: int, words: int, rows: list[int] | None) -> None:
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(4, vocab, generator=g)
    m = 4 if rows is None else len(rows)
    bitmask = torch.randint(-(2**31), 2**31 - 1, (m, words), dtype=torch.int32, generator=g)
    expected = reference_mask(logits, rows if rows is not None else list(range(4)), bitmask)
    row_index = None if rows is None else torch.tensor(rows)
    got = apply_token_bitmask(logits.clone(), row_index, bitmask)
    assert torch.equal(got, expected)


def test_structured_outputs_params_validate() -> None:
    assert SamplingParams(structured_outputs={"regex": "a+"}).structured_outputs == StructuredOutputsParams(
        regex="a+"
    )
    spec = StructuredOutputsParams(json={"type": "object"})
    assert json.loads(spec.json) == {"type": "object"}  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="exactly one"):
        StructuredOutputsParams(regex="a", choice=["b"])
    with pytest.raises(ValueError, match="exactly one"):
        StructuredOutputsParams()
    with pytest.raises(ValueError, match="structured_outputs"):
        SamplingParams(structured_outputs={"nope": 1})
    with pytest.raises(ValueError, match="choice"):
        StructuredOutputsParams(choice=[])


@pytest.fixture(scope="module", params=[False, True], ids=["sync", "async"])
def llm(request: pytest.FixtureRequest, tiny_model_dir: Any) -> LLM:
    model: Path = tiny_model_dir("llama")
    # A small KV pool: a batch of long outputs preempts, and preempted requests replay their grammar.
    return LLM(
        str(model),
        device="cpu",
        dtype="float32",
        max_model_len=160,
        num_gpu_blocks_override=24,
        block_size=16,
        async_scheduling=request.param,
    )


def test_json_schema_always_validates(llm: LLM) -> None:
    params = [
        SamplingParams(
            temperature=1.0, seed=100 * i, n=2, max_tokens=140, structured_outputs={"json": SCHEMA}
        )
        for i in range(6)
    ]
    outs = llm.generate(["Record:"] * len(params), params, use_tqdm=False)
    texts = [c.text for o in outs for c in o.outputs]
    for o in outs:
        for c in o.outputs:
            assert c.finish_reason == "stop", c
            jsonschema.validate(json.loads(c.text), SCHEMA)
    assert len(set(texts)) > len(texts) // 2
    assert llm.engine.scheduler.num_preemptions > 0  # some grammars were replayed


def test_regex_and_choice_always_match(llm: LLM) -> None:
    choices = ["red", "green", 'blue\n"x"']
    params = [
        SamplingParams(temperature=1.0, seed=i, max_tokens=20, structured_outputs={"regex": REGEX})
        for i in range(6)
    ] + [
        SamplingParams(temperature=1.0, seed=i, max_tokens=20, structured_outputs={"choice": choices})
        for i in range(6)
    ]
    outs = llm.generate(["Answer:"] * len(params), params, use_tqdm=False)
    for o in outs[:6]:
        assert re.fullmatch(REGEX, o.outputs[0].text), o.outputs[0].text
    for o in outs[6:]:
        assert o.outputs[0].text in choices


def test_constrained_and_free_requests_share_a_batch(llm: LLM) -> None:
    free = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    (expected,) = llm.generate(["Once upon a time"], free, use_tqdm=False)
    outs = llm.generate(
        ["Once upon a time", "Answer:"],
        [free, SamplingParams(temperature=1.0, seed=3, max_tokens=20, structured_outputs={"regex": REGEX})],
        use_tqdm=False,
    )
    assert outs[0].outputs[0].token_ids == expected.outputs[0].token_ids
    assert re.fullmatch(REGEX, outs[1].outputs[0].text)


def test_uncompilable_constraint_is_refused(llm: LLM) -> None:
    with pytest.raises(ValueError, match="regex"):
        llm.generate("hi", SamplingParams(structured_outputs={"regex": "[a-("}), use_tqdm=False)
    with pytest.raises(ValueError, match="wat"):
        llm.generate("hi", SamplingParams(structured_outputs={"json": {"type": "wat"}}), use_tqdm=False)


def test_chat_with_tools_renders_them_and_a_schema_forces_a_call(llm: LLM) -> None:
    tools = [{"type": "function", "function": {"name": "weather", "parameters": {"type": "object"}}}]
    template = "{% for t in tools %}[{{ t['function']['name'] }}]{% endfor %}{{ messages[-1]['content'] }}"
    args = {"type": "object", "properties": {"city": {"enum": ["Paris", "Rome"]}}, "required": ["city"]}
    params = SamplingParams(
        temperature=1.0,
        seed=0,
        max_tokens=40,
        structured_outputs={"json": args, "disable_any_whitespace": True},
    )
    (out,) = llm.chat(
        [{"role": "user", "content": "hi"}], params, use_tqdm=False, tools=tools, chat_template=template
    )
    assert llm.get_tokenizer().decode(out.prompt_token_ids) == "[weather]hi"
    assert json.loads(out.outputs[0].text)["city"] in ("Paris", "Rome")


def test_batched_masks_equal_row_by_row(tiny_model_dir: Any) -> None:
    """`grammar_bitmask` puts each matcher's mask in its own row after catching it up: the same
    bits as a fresh matcher fed the same output, for matchers at different points of different
    grammars, one of them finished (EOS only)."""
    import dataclasses

    from hallm.core.structured_output import GrammarMatcher, grammar_bitmask

    source = str(tiny_model_dir("llama"))
    specs = [
        StructuredOutputsParams(json=SCHEMA),
        StructuredOutputsParams(regex=REGEX),
        StructuredOutputsParams(choice=["alpha", "beta"]),
        StructuredOutputsParams(regex="a"),
    ]
    specs = [dataclasses.replace(s, tokenizer=source) for s in specs]
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(source)
    outputs = [
        tok.encode('{"id": 1', add_special_tokens=False),
        tok.encode("yes-", add_special_tokens=False),
        [],
        [],
    ]
    outputs[3] = tok.encode("a", add_special_tokens=False)  # its grammar is complete: EOS only
    eos = [frozenset({tok.eos_token_id})] * len(specs)
    specs, outputs, eos = specs * 3, outputs * 3, eos * 3  # every grammar at several rows
    batched = grammar_bitmask([GrammarMatcher(s) for s in specs], outputs, eos)
    for i, spec in enumerate(specs):
        alone = GrammarMatcher(spec)
        alone.catch_up(outputs[i])
        row = torch.zeros(batched.shape[1], dtype=torch.int32)
        alone.fill(row[: alone.num_words], eos[i])
        assert torch.equal(batched[i], row), f"row {i} ({spec.kind})"
        assert int(row.count_nonzero()) > 0
    eos_only = torch.zeros(batched.shape[1], dtype=torch.int32)
    eos_only.view(torch.uint8)[tok.eos_token_id // 8] = 1 << (tok.eos_token_id % 8)
    assert torch.equal(batched[3], eos_only), "a finished grammar allows EOS only"
    # Staged: the reused host buffers hold the previous steps' bits (here all ones); every word of
    # each row is rewritten, both buffers in turn, and a row wider than its grammar's vocabulary
    # gets zeros past it.
    from hallm.core.structured_output import BitmaskStaging

    staging = BitmaskStaging()
    for _ in range(2):
        staging.take(len(specs), batched.shape[1]).fill_(-1)
    for _ in range(3):
        staged = grammar_bitmask([GrammarMatcher(s) for s in specs], outputs, eos, staging)
        assert torch.equal(staged, batched)
    wide = torch.full((batched.shape[1] + 3,), -1, dtype=torch.int32)
    matcher = GrammarMatcher(specs[0])
    matcher.catch_up(outputs[0])
    matcher.fill_ptr(wide.data_ptr(), wide.numel(), eos[0])
    assert torch.equal(wide[: batched.shape[1]], batched[0]) and not wide[batched.shape[1] :].any()
