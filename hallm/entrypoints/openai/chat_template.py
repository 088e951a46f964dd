"""Chat messages -> prompt text -> token ids, with the model's (or a trusted request's) template.

A chat template is a program (Jinja): a request's own template is code a client sends to the
server, so it is refused unless the operator trusts clients with `--trust-request-chat-template`
(as vLLM does). `chat_template_kwargs` are template variables only: a name that is an argument
of the renderer itself (`chat_template`, `tokenize`, ...) would change how the prompt is built,
and is refused. Rendering runs on the server's worker threads with a time limit (offload.py).
"""

from __future__ import annotations

import functools
import inspect
from typing import Any

from hallm.entrypoints.openai.request_body import RequestError


@functools.cache
def _renderer_arguments() -> frozenset[str]:
    from transformers import PreTrainedTokenizerBase

    names = set(inspect.signature(PreTrainedTokenizerBase.apply_chat_template).parameters)
    return frozenset(names - {"self", "kwargs"}) | {"conversation", "messages", "return_dict"}


def check_template_request(
    chat_template: str | None, kwargs: dict[str, Any] | None, trusted: bool
) -> dict[str, Any]:
    """Refuse a request's own template unless `trusted`, and kwargs that are renderer arguments;
    returns the kwargs to pass on as template variables."""
    if chat_template is not None and not trusted:
        raise RequestError(
            "this server does not run a request's own chat_template (it is code sent by the client); omit "
            "it to use the model's template, or start the server with --trust-request-chat-template",
            "chat_template",
        )
    extra = dict(kwargs or {})
    reserved = sorted(set(extra) & _renderer_arguments())
    if reserved:
        raise RequestError(
            f"chat_template_kwargs may only set template variables; {reserved} are arguments of the "
            "renderer (use the request's own fields: chat_template, tools, documents, "
            "add_generation_prompt, continue_final_message)",
            "chat_template_kwargs",
        )
    return extra


def render_chat(
    tokenizer: Any,
    messages: list[dict[str, Any]],
    *,
    add_generation_prompt: bool = True,
    continue_final_message: bool = False,
    chat_template: str | None = None,
    tools: list[dict[str, Any]] | None = None,
    documents: list[dict[str, Any]] | None = None,
    variables: dict[str, Any] | None = None,
) -> str:
    """The conversation rendered as prompt text. A template that fails on the input (a role it
    does not allow, `raise_exception(...)`) is a 400."""
    if chat_template is None and getattr(tokenizer, "chat_template", None) is None:
        raise RequestError(
            "this model's tokenizer has no chat template; use /v1/completions (or start the server with "
            "--trust-request-chat-template and pass chat_template)",
            "messages",
        )
    if add_generation_prompt and continue_final_message:
        raise RequestError(
            "continue_final_message continues the last message, add_generation_prompt starts a new one: "
            "set add_generation_prompt to false",
            "continue_final_message",
        )
    try:
        text = tokenizer.apply_chat_template(
            messages,
            add_generation_prompt=add_generation_prompt,
            continue_final_message=continue_final_message,
            tokenize=False,
            chat_template=chat_template,
            tools=tools,
            documents=documents,
            **(variables or {}),
        )
    except Exception as exc:  # jinja2 TemplateError, raise_exception(...) in the template, bad kwargs
        raise RequestError(f"the chat template failed on these messages: {exc}", "messages") from None
    if not isinstance(text, str):
        raise RequestError("the chat template did not render to text", "messages")
    return text


def encode_chat(
    tokenizer: Any, messages: list[dict[str, Any]], add_special_tokens: bool = False, **kwargs: Any
) -> list[int]:
    """Render (render_chat's keywords) and tokenize. The rendered text already holds the template's
    special tokens, so by default none are added (vLLM's `add_special_tokens=False`)."""
    text = render_chat(tokenizer, messages, **kwargs)
    return list(tokenizer.encode(text, add_special_tokens=add_special_tokens))
