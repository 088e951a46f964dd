"""Structured output through the server, with the official openai client, on a tiny random model
sampled at temperature 1 (it picks freely among whatever the grammar allows): JSON-schema outputs
always parse and validate (jsonschema), choice and regex outputs always match, with n>1 and
streaming; a constraint the grammar engine cannot compile is a 400 saying why."""

from __future__ import annotations

import json
import re
from typing import Any

import httpx
import jsonschema
import openai
import pytest

from tests.server.utils import API_KEY, MODEL_NAME, Server

SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 6},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "pet": {"enum": ["cat", "dog", None]},
        "ok": {"type": "boolean"},
    },
    "required": ["name", "age", "pet", "ok"],
    "additionalProperties": False,
}
MESSAGES = [{"role": "user", "content": "Describe a person as JSON."}]
# A random model spends many tokens on whitespace; one optional space per gap keeps tests fast.
COMPACT = {"guided_whitespace_pattern": " ?"}
CHOICES = ["yes", "no", 'say "maybe"', "çé 東京"]
REGEX = r"[a-c]{2,4}-[0-9]{1,3}(\.[0-9])?"


@pytest.fixture(scope="module")
def client(server: Server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=API_KEY, max_retries=0, timeout=120)


def test_json_schema_outputs_always_validate(client: openai.OpenAI) -> None:
    texts = []
    for seed in range(0, 400, 100):  # n=4 samples use seeds seed..seed+3
        out = client.chat.completions.create(
            model=MODEL_NAME,
            messages=MESSAGES,  # type: ignore[arg-type]
            temperature=1.0,
            seed=seed,
            n=4,
            max_tokens=120,
            response_format={"type": "json_schema", "json_schema": {"name": "person", "schema": SCHEMA}},
            extra_body=COMPACT,
        )
        for choice in out.choices:
            assert choice.finish_reason == "stop", choice
            texts.append(choice.message.content or "")
    for text in texts:
        jsonschema.validate(json.loads(text), SCHEMA)
    assert len(set(texts)) > len(texts) // 2  # sampled freely, not one forced string
    # the default whitespace (a bounded run between tokens) also validates
    out = client.chat.completions.create(
        model=MODEL_NAME,
        messages=MESSAGES,  # type: ignore[arg-type]
        temperature=1.0,
        seed=7,
        max_tokens=200,
        response_format={"type": "json_schema", "json_schema": {"name": "person", "schema": SCHEMA}},
    )
    if out.choices[0].finish_reason == "stop":
        jsonschema.validate(json.loads(out.choices[0].message.content or ""), SCHEMA)


def test_json_schema_streamed(client: openai.OpenAI) -> None:
    for seed in range(0, 200, 100):
        chunks = list(
            client.chat.completions.create(
                model=MODEL_NAME,
                messages=MESSAGES,  # type: ignore[arg-type]
                temperature=1.0,
                seed=seed,
                n=2,
                max_tokens=120,
                stream=True,
                extra_body=COMPACT,
                response_format={"type": "json_schema", "json_schema": {"name": "p", "schema": SCHEMA}},
            )
        )
        for index in range(2):
            text = "".join(
                c.choices[0].delta.content or "" for c in chunks if c.choices and c.choices[0].index == index
            )
            jsonschema.validate(json.loads(text), SCHEMA)


def test_json_object_in_completions(client: openai.OpenAI) -> None:
    for seed in range(3):
        out = client.completions.create(
            model=MODEL_NAME,
            prompt="JSON:",
            temperature=1.0,
            seed=seed,
            max_tokens=40,
            extra_body={
                "response_format": {"type": "json_object"},
                "guided_whitespace_pattern": "",
            },
        )
        if out.choices[0].finish_reason == "stop":
            assert isinstance(json.loads(out.choices[0].text), dict)
        else:  # cut by max_tokens: still a prefix of an object
            assert out.choices[0].text.startswith("{")


@pytest.mark.parametrize("field", ["structured_outputs", "guided_choice"])
def test_choice_always_matches(client: openai.OpenAI, field: str) -> None:
    extra = {"structured_outputs": {"choice": CHOICES}} if field == "structured_outputs" else {field: CHOICES}
    seen = set()
    for seed in range(4):
        out = client.completions.create(
            model=MODEL_NAME,
            prompt="Answer:",
            temperature=1.0,
            seed=seed,
            n=4,
            max_tokens=20,
            extra_body=extra,
        )
        for choice in out.choices:
            assert choice.text in CHOICES and choice.finish_reason == "stop"
            seen.add(choice.text)
    assert len(seen) > 1


def test_regex_and_grammar_always_match(client: openai.OpenAI) -> None:
    for seed in range(0, 400, 100):
        out = client.completions.create(
            model=MODEL_NAME,
            prompt="Code:",
            temperature=1.0,
            seed=seed,
            n=4,
            max_tokens=30,
            extra_body={"guided_regex": REGEX},
        )
        for choice in out.choices:
            assert re.fullmatch(REGEX, choice.text), choice.text
    grammar = 'start: "(" num ("+" num)* ")"\nnum: /[1-9][0-9]?/'
    for seed in range(3):
        out = client.completions.create(
            model=MODEL_NAME,
            prompt="Sum:",
            temperature=1.0,
            seed=seed,
            max_tokens=60,
            extra_body={"structured_outputs": {"grammar": grammar}},
        )
        text = out.choices[0].text
        if out.choices[0].finish_reason == "stop":
            assert re.fullmatch(r"\([1-9][0-9]?(\+[1-9][0-9]?)*\)", text), text
        else:
            assert re.fullmatch(r"\([1-9][0-9]?(\+[1-9][0-9]?)*\+?[1-9]?[0-9]?", text), text


@pytest.mark.parametrize(
    ("extra", "param", "words"),
    [
        ({"guided_regex": "[a-("}, "guided_regex", ["regex", "range"]),
        ({"structured_outputs": {"json": {"type": "wat"}}}, "structured_outputs", ["wat"]),
        ({"structured_outputs": {"grammar": 'start: "a" ++'}}, "structured_outputs", ["grammar"]),
        ({"structured_outputs": {"choice": []}}, "structured_outputs", ["choice"]),
        ({"structured_outputs": {"regex": "a", "choice": ["b"]}}, "structured_outputs", ["exactly one"]),
        ({"structured_outputs": {"nope": 1}}, "structured_outputs", ["nope"]),
        ({"guided_regex": "a", "guided_choice": ["a"]}, "guided_choice", ["one output constraint"]),
        ({"response_format": {"type": "json_schema"}}, "response_format", ["schema"]),
        ({"response_format": {"type": "xml"}}, "response_format", ["xml"]),
        (
            {"guided_decoding_backend": "outlines", "guided_regex": "a"},
            "guided_decoding_backend",
            ["llguidance"],
        ),
    ],
)
def test_bad_constraints_are_400_saying_why(
    server: Server, extra: dict[str, Any], param: str, words: list[str]
) -> None:
    body = {"model": MODEL_NAME, "prompt": "hi", "max_tokens": 5, **extra}
    resp = httpx.post(f"{server.url}/v1/completions", json=body, headers=server.headers, timeout=30)
    assert resp.status_code == 400, resp.text
    err = resp.json()["error"]
    assert err["param"] == param, err
    for word in words:
        assert word in err["message"], err
