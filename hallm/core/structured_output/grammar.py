"""Grammars through llguidance: a request's StructuredOutputsParams -> a compiled matcher.

llguidance (Rust, no dependencies) builds the token mask lazily from a lexer and an Earley
parser, so a new schema costs milliseconds rather than an up-front automaton over the whole
vocabulary, and it covers the most of JSON Schema among the grammar engines vLLM can use; it also
takes regexes and Lark grammars (and GBNF, converted). A compiled grammar is kept per
(tokenizer, grammar) in a small LRU cache; each request gets a cheap copy of its matcher.

The vocabulary comes from the model's tokenizer, loaded once per process from the source the
engine put in the params (`StructuredOutputsParams.tokenizer`), or registered by a process that
already has the tokenizer (`register_tokenizer`).
"""

from __future__ import annotations

import collections
import json
import logging
import threading
from typing import Any

from hallm.core.structured_output.params import StructuredOutputsParams

logger = logging.getLogger(__name__)

#: Whitespace allowed between JSON tokens by default: a bounded run, so that a model cannot
#: spend its whole budget on blanks, yet pretty-printed JSON is possible.
MAX_JSON_WHITESPACE = 16
#: Compiled grammars kept per process.
CACHE_SIZE = 256


class StructuredOutputError(ValueError):
    """A grammar, schema or regex the grammar engine cannot compile; the message says why."""


_lock = threading.Lock()
_tokenizers: dict[str, Any] = {}
_compiled: collections.OrderedDict[tuple[str, str], Any] = collections.OrderedDict()


def _llguidance() -> Any:
    try:
        import llguidance
        import llguidance.hf
    except ImportError as e:  # pragma: no cover - a core dependency
        raise StructuredOutputError(
            f"structured output needs the llguidance package ({e}); pip install llguidance"
        ) from None
    return llguidance


def register_tokenizer(source: str, tokenizer: Any) -> None:
    """Make `tokenizer` (an HF fast tokenizer already loaded from `source`) the vocabulary of
    grammars bound to `source` in this process, so it is not loaded a second time."""
    with _lock:
        if source not in _tokenizers:
            _tokenizers[source] = _llguidance().hf.from_tokenizer(tokenizer)


def _vocabulary(source: str) -> Any:
    with _lock:
        found = _tokenizers.get(source)
    if found is not None:
        return found
    from hallm.core.model_loader import load_tokenizer

    logger.info("loading the grammar vocabulary from %s", source)
    llg = _llguidance().hf.from_tokenizer(load_tokenizer(source))
    with _lock:
        return _tokenizers.setdefault(source, llg)


def vocabulary_size(source: str) -> int:
    """The number of tokens in the grammar vocabulary of `source` (one mask bit each)."""
    return int(_vocabulary(source).vocab_size)


def grammar_text(spec: StructuredOutputsParams) -> str:
    """The llguidance grammar (its JSON form) for a spec."""
    llg = _llguidance()
    matcher = llg.LLMatcher
    if spec.json is not None or spec.json_object:
        schema: Any = json.loads(spec.json) if isinstance(spec.json, str) else {"type": "object"}
        if spec.disable_any_whitespace:
            options: dict[str, Any] = {"whitespace_flexible": False}
        else:
            pattern = spec.whitespace_pattern or rf"[\x20\x0A\x0D\x09]{{0,{MAX_JSON_WHITESPACE}}}"
            options = {"whitespace_flexible": True, "whitespace_pattern": pattern}
        try:
            return str(matcher.grammar_from_json_schema(schema, defaults=options))
        except ValueError as e:
            raise StructuredOutputError(f"the JSON schema is invalid: {e}") from None
    if spec.regex is not None:
        return str(matcher.grammar_from_regex(spec.regex))
    if spec.choice is not None:
        # JSON string literals are Lark literals: quotes, backslashes and control characters escaped.
        alternatives = " | ".join(json.dumps(c, ensure_ascii=False) for c in spec.choice)
        return str(matcher.grammar_from_lark(f"start: {alternatives}"))
    assert spec.grammar is not None
    from llguidance.gbnf_to_lark import any_to_lark

    try:
        lark = any_to_lark(spec.grammar)  # GBNF/EBNF (`::=` rules) is converted, Lark kept
    except Exception as e:
        raise StructuredOutputError(f"the grammar is invalid: {e}") from None
    return str(matcher.grammar_from_lark(lark))


def compile_grammar(spec: StructuredOutputsParams) -> Any:
    """The compiled matcher for `spec` (cached; copy it with `.deep_copy()` before use).

    Raises StructuredOutputError with the grammar engine's reason when it cannot compile."""
    if spec.tokenizer is None:
        raise StructuredOutputError(
            "structured_outputs has no vocabulary: the engine binds it when it admits the request"
        )
    text = grammar_text(spec)
    key = (spec.tokenizer, text)
    with _lock:
        found = _compiled.get(key)
        if found is not None:
            _compiled.move_to_end(key)
            return found
    vocabulary = _vocabulary(spec.tokenizer)
    compiled = _llguidance().LLMatcher(vocabulary, text, log_level=0)
    if compiled.is_error():
        raise StructuredOutputError(f"cannot compile the {spec.kind} constraint: {compiled.get_error()}")
    with _lock:
        _compiled[key] = compiled
        while len(_compiled) > CACHE_SIZE:
            _compiled.popitem(last=False)
    return compiled


def bind(spec: StructuredOutputsParams, source: str) -> None:
    """Bind a spec to the model's tokenizer source (once) and check that it compiles."""
    if spec.tokenizer is None:
        spec.tokenizer = source
    compile_grammar(spec)
