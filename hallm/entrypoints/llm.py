"""The offline API, mirroring vLLM's: `LLM(model=...).generate(prompts, sampling_params)`."""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Any

from hallm.core.engine import LLMEngine, PromptType
from hallm.core.engine_args import EngineArgs
from hallm.core.outputs import RequestOutput
from hallm.core.sampling_params import SamplingParams

ChatMessage = dict[str, Any]


class LLM:
    """An engine for offline batched generation.

    model: a HF model directory or a .gguf file; None serves the default model
    (SmolLM2-135M-Instruct). device: a device id such as "cpu" or "cuda", or "auto" (the
    default; also read from HALLM_DEVICE). Every other keyword is an `EngineArgs` field
    (dtype, max_model_len, block_size, max_num_seqs, gpu_memory_utilization, kv_cache_memory_bytes,
    seed, load_format, enable_prefix_caching, num_gpu_blocks_override, max_num_batched_tokens, ...).
    """

    def __init__(self, model: str | None = None, device: str | None = None, **kwargs: Any) -> None:
        unknown = set(kwargs) - set(EngineArgs.__dataclass_fields__)
        if unknown:
            raise TypeError(
                f"LLM() got unknown arguments {sorted(unknown)}; see hallm.core.engine_args.EngineArgs"
            )
        self.engine = LLMEngine.from_engine_args(EngineArgs(model=model, device=device, **kwargs))
        self._counter = itertools.count()

    def get_tokenizer(self) -> Any:
        return self.engine.tokenizer

    def generate(
        self,
        prompts: PromptType | Sequence[PromptType],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = True,
    ) -> list[RequestOutput]:
        """Generate for every prompt; outputs come back in the order of the prompts.

        A prompt is a string, a list of token ids, or {"prompt_token_ids": [...]}. Every prompt is
        validated before any is queued, so one bad prompt fails the call cleanly.
        """
        prompt_list = _as_prompt_list(prompts)
        if isinstance(sampling_params, Sequence):
            if len(sampling_params) != len(prompt_list):
                raise ValueError(
                    f"got {len(sampling_params)} sampling_params for {len(prompt_list)} prompts; pass one or one per prompt"
                )
            params_list = list(sampling_params)
        else:
            params_list = [sampling_params or SamplingParams()] * len(prompt_list)
        if any(p.structured_outputs is not None for p in params_list) and self.engine.tokenizer is not None:
            from hallm.core.structured_output import register_tokenizer

            config = self.engine.config.model
            register_tokenizer(config.tokenizer or config.model, self.engine.tokenizer)
        ids = [str(next(self._counter)) for _ in prompt_list]
        added: list[str] = []
        try:
            for rid, prompt, params in zip(ids, prompt_list, params_list, strict=True):
                self.engine.add_request(rid, prompt, params)
                added.append(rid)
        except Exception:
            self.engine.abort_request(added)
            raise
        return self._run(ids, use_tqdm)

    def chat(
        self,
        messages: list[ChatMessage] | list[list[ChatMessage]],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = True,
        add_generation_prompt: bool = True,
        chat_template: str | None = None,
        tools: list[dict[str, Any]] | None = None,
        continue_final_message: bool = False,
        chat_template_kwargs: dict[str, Any] | None = None,
    ) -> list[RequestOutput]:
        """Apply the tokenizer's chat template to each conversation, then generate.

        `tools` (OpenAI-style function definitions) are rendered by the template, as the server
        does; the reply is text (parse tool calls from it with a parser of
        hallm.entrypoints.openai.tool_parsers, or constrain it with structured_outputs).
        """
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        prompts: list[PromptType] = [
            {
                "prompt_token_ids": self.apply_chat_template(
                    conv,  # type: ignore[arg-type]
                    add_generation_prompt,
                    chat_template,
                    tools=tools,
                    continue_final_message=continue_final_message,
                    chat_template_kwargs=chat_template_kwargs,
                )
            }
            for conv in conversations
        ]
        return self.generate(prompts, sampling_params, use_tqdm)

    def apply_chat_template(
        self,
        conversation: list[ChatMessage],
        add_generation_prompt: bool = True,
        chat_template: str | None = None,
        tools: list[dict[str, Any]] | None = None,
        continue_final_message: bool = False,
        chat_template_kwargs: dict[str, Any] | None = None,
    ) -> list[int]:
        from hallm.entrypoints.openai.chat_template import check_template_request, encode_chat

        variables = check_template_request(None, chat_template_kwargs, trusted=True)
        return encode_chat(
            self.engine.tokenizer,
            conversation,
            add_generation_prompt=add_generation_prompt and not continue_final_message,
            continue_final_message=continue_final_message,
            chat_template=chat_template,
            tools=tools,
            variables=variables,
        )

    def reset_prefix_cache(self) -> bool:
        return self.engine.reset_prefix_cache()

    def _run(self, ids: list[str], use_tqdm: bool) -> list[RequestOutput]:
        from tqdm.auto import tqdm

        results: dict[str, RequestOutput] = {}
        wanted = set(ids)
        bar = tqdm(total=len(ids), desc="Processed prompts", disable=not use_tqdm, dynamic_ncols=True)
        try:
            while len(results) < len(ids) and self.engine.has_unfinished_requests():
                for out in self.engine.step(final_only=True):  # only finished ones are read
                    if out.finished and out.request_id in wanted:
                        results[out.request_id] = out
                        bar.update(1)
        finally:
            bar.close()
        return [results[rid] for rid in ids]


def _as_prompt_list(prompts: Any) -> list[PromptType]:
    if isinstance(prompts, str | dict):
        return [prompts]
    if isinstance(prompts, Sequence) and prompts and all(isinstance(t, int) for t in prompts):
        return [list(prompts)]  # one prompt given as token ids
    if isinstance(prompts, Sequence):
        if not prompts:
            raise ValueError("prompts is empty; pass at least one prompt")
        return list(prompts)
    raise TypeError(
        f"prompts must be a string, a list of token ids, or a list of those; got {type(prompts).__name__}"
    )
