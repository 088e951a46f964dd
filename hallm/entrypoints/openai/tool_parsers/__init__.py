"""Tool-call parsers, chosen with `hallm serve --tool-call-parser NAME` (vLLM's names)."""

from hallm.entrypoints.openai.tool_parsers.base import ToolCall, ToolCallStream, ToolParser
from hallm.entrypoints.openai.tool_parsers.formats import (
    HermesToolParser,
    Llama3JsonToolParser,
    MistralToolParser,
)

TOOL_PARSERS: dict[str, type[ToolParser]] = {
    "hermes": HermesToolParser,
    "qwen": HermesToolParser,  # Qwen 2.5 / 3 use the Hermes format
    "llama3_json": Llama3JsonToolParser,
    "mistral": MistralToolParser,
}

__all__ = ["TOOL_PARSERS", "ToolCall", "ToolCallStream", "ToolParser"]
