"""Structured output: constrain a request's tokens to a JSON schema, regex, choice or grammar."""

from hallm.core.structured_output.bitmask import (
    BitmaskStaging,
    GrammarMatcher,
    apply_token_bitmask,
    grammar_bitmask,
)
from hallm.core.structured_output.grammar import (
    StructuredOutputError,
    bind,
    compile_grammar,
    register_tokenizer,
)
from hallm.core.structured_output.params import StructuredOutputsParams

__all__ = [
    "BitmaskStaging",
    "GrammarMatcher",
    "StructuredOutputError",
    "StructuredOutputsParams",
    "apply_token_bitmask",
    "bind",
    "compile_grammar",
    "grammar_bitmask",
    "register_tokenizer",
]
