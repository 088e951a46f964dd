"""The bodies of POST /tokenize and POST /detokenize."""

from __future__ import annotations

from typing import Any

from hallm.entrypoints.openai.chat_request import ChatMessage, ChatTool
from hallm.entrypoints.openai.request_body import OpenBody


class TokenizeRequest(OpenBody):
    """POST /tokenize: a prompt, or chat messages (rendered with the chat template)."""

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    #: None: True for a prompt, False for messages (the template already adds the special tokens).
    add_special_tokens: bool | None = None
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    chat_template: str | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    tools: list[ChatTool] | None = None
    return_token_strs: bool = False


class DetokenizeRequest(OpenBody):
    """POST /detokenize."""

    model: str | None = None
    tokens: list[int]
