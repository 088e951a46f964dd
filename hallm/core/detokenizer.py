"""Incremental detokenization: token ids in, streamable text deltas out, stop strings applied.

Two decoding strategies behind one class:
  * `tokenizers.decoders.DecodeStream` (the library's own streaming decoder) for fast tokenizers
    that expose `backend_tokenizer`. It buffers tokens until they decode to complete UTF-8, so a
    character split over byte-level tokens (emoji, CJK) never surfaces as U+FFFD mid-stream.
  * vLLM's prefix-offset/read-offset algorithm for anything else (slow tokenizers, custom ones),
    decoding a short sliding window of ids and emitting only what grew past the previous window.

Stop strings: text is searched only where a match could end in the newly added text; a match
truncates `output_text` (before the stop string, or after it with include_stop_str_in_output).
While streaming, up to len(longest stop string) - 1 characters are held back, so a delta never
contains text that a later token turns into (the start of) a stop string.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from hallm.core.sampling_params import SamplingParams

logger = logging.getLogger(__name__)

try:  # tokenizers >= 0.21
    from tokenizers.decoders import DecodeStream
except ImportError:  # pragma: no cover - older tokenizers
    DecodeStream = None  # type: ignore[misc,assignment]

_REPLACEMENT = "\ufffd"
_INVALID_PREFIX = "Invalid prefix encountered"
# Prompt ids kept as left context so the first output token decodes as it would mid-text
# (e.g. SentencePiece's leading-space handling), as vLLM does.
_PROMPT_CONTEXT_MIN = 4
_PROMPT_CONTEXT_MAX = 24
_OFFSETS_PROMPT_CONTEXT = 5


class _StreamDecoder:
    """Text deltas from `tokenizers.decoders.DecodeStream` (vLLM's FastIncrementalDetokenizer)."""

    def __init__(self, tokenizer: Any, prompt_token_ids: Sequence[int], params: SamplingParams) -> None:
        self._tokenizer = tokenizer
        self._backend = tokenizer.backend_tokenizer
        self._skip_special = params.skip_special_tokens
        self._stream = DecodeStream(skip_special_tokens=self._skip_special)
        # Ids DecodeStream holds back (not yet complete UTF-8), after `_context`: the last ids
        # whose text was emitted, so flush() can decode the tail as it reads mid-text.
        self._pending: list[int] = []
        self._context: list[int] = []
        # The Rust decoder always joins added tokens its own way; emulate
        # spaces_between_special_tokens=False by emitting consecutive added tokens verbatim.
        self._added: dict[int, str] | None = None
        self._last_added = False
        if not (params.skip_special_tokens or params.spaces_between_special_tokens):
            added = {tid: tok.content for tid, tok in tokenizer.added_tokens_decoder.items()}
            self._added = added or None

        for tid in self._prompt_context(tokenizer, prompt_token_ids):
            self._step(tid)

    @staticmethod
    def _prompt_context(tokenizer: Any, prompt: Sequence[int]) -> Sequence[int]:
        """A short prompt suffix that decodes cleanly (does not start mid-character)."""
        if len(prompt) <= _PROMPT_CONTEXT_MIN:
            return prompt
        for i in range(_PROMPT_CONTEXT_MIN, min(len(prompt), _PROMPT_CONTEXT_MAX) + 1):
            suffix = prompt[-i:]
            if _REPLACEMENT not in tokenizer.decode(list(suffix)):
                return suffix
        return prompt[-_PROMPT_CONTEXT_MAX:]

    def _step(self, token_id: int) -> str | None:
        try:
            return self._stream.step(self._backend, token_id)
        except (OverflowError, TypeError):
            logger.warning("detokenizer: invalid token id %r, rendered as empty text", token_id)
            return None
        except Exception as e:
            if not str(e).startswith(_INVALID_PREFIX):
                raise
            # Rare non-monotonic decodes break DecodeStream's prefix; restart it (vLLM does too).
            logger.warning("detokenizer: DecodeStream lost its prefix; restarting it")
            self._stream = DecodeStream(skip_special_tokens=self._skip_special)
            return self._stream.step(self._backend, token_id)

    def step(self, token_id: int) -> str:
        text = self._step(token_id)
        self._pending.append(token_id)
        if text:
            self._context = (self._context + self._pending)[-_OFFSETS_PROMPT_CONTEXT:]
            self._pending = []
        if self._added is not None:
            content = self._added.get(token_id)
            if content is not None and self._last_added:
                text = content
            self._last_added = content is not None
        return text or ""

    def flush(self) -> str:
        """The text of the held-back ids (a sequence that ends inside a character): what
        `tokenizer.decode` gives for them, U+FFFD for the incomplete bytes."""
        if not self._pending:
            return ""
        kwargs = {"skip_special_tokens": self._skip_special, "clean_up_tokenization_spaces": False}
        head = self._tokenizer.decode(self._context, **kwargs) if self._context else ""
        full = self._tokenizer.decode(self._context + self._pending, **kwargs)
        self._context, self._pending = [], []
        return full[len(head) :] if full.startswith(head) else full


class _OffsetsDecoder:
    """vLLM's classic `detokenize_incrementally`, over ids with `tokenizer.decode` (any tokenizer).

    ids[prefix:read] is text already emitted (kept as context); ids[prefix:] is decoded after each
    new id and whatever extends past the context's text is the delta, unless it ends in U+FFFD
    (an incomplete UTF-8 sequence: wait for the next token).
    """

    def __init__(self, tokenizer: Any, prompt_token_ids: Sequence[int], params: SamplingParams) -> None:
        self._tokenizer = tokenizer
        self._decode_kwargs = {
            "skip_special_tokens": params.skip_special_tokens,
            "spaces_between_special_tokens": params.spaces_between_special_tokens,
            "clean_up_tokenization_spaces": False,
        }
        self._ids = list(prompt_token_ids[-(_OFFSETS_PROMPT_CONTEXT + 2) :])
        self._read = len(self._ids)
        self._prefix = max(self._read - _OFFSETS_PROMPT_CONTEXT, 0)

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, **self._decode_kwargs) if ids else ""

    def step(self, token_id: int) -> str:
        self._ids.append(token_id)
        prefix_text = self._decode(self._ids[self._prefix : self._read])
        new_text = self._decode(self._ids[self._prefix :])
        if len(new_text) <= len(prefix_text) or new_text.endswith(_REPLACEMENT):
            return ""
        self._prefix, self._read = self._read, len(self._ids)
        if self._prefix > 64:  # drop ids that are no longer context, keeping the window small
            del self._ids[: self._prefix]
            self._read -= self._prefix
            self._prefix = 0
        return new_text[len(prefix_text) :]

    def flush(self) -> str:
        """The text of the ids not yet emitted (a sequence that ends inside a character), as
        `tokenizer.decode` gives it: U+FFFD for the incomplete bytes."""
        if self._read == len(self._ids):
            return ""
        prefix_text = self._decode(self._ids[self._prefix : self._read])
        new_text = self._decode(self._ids[self._prefix :])
        self._prefix = self._read = len(self._ids)
        return new_text[len(prefix_text) :] if len(new_text) > len(prefix_text) else ""


class IncrementalDetokenizer:
    """Turns one sequence's output token ids into text, incrementally, with stop strings.

    tokenizer:        a transformers tokenizer (fast ones use DecodeStream)
    prompt_token_ids: the prompt (its tail is left context for decoding the first output tokens)
    params:           skip_special_tokens, spaces_between_special_tokens, stop,
                      include_stop_str_in_output, min_tokens, detokenize are honoured
    use_decode_stream: force (True) or forbid (False) the DecodeStream path; None = when possible
    deferred:         a consumer that reads the text only once the sequence has finished (the
                      offline API) lets a sequence with no stop strings skip the per-token
                      decoder: its text is one `tokenizer.decode` at the first read. `update`
                      and `flush` then return no deltas; a read before the sequence finishes
                      replays the decoder over the ids so far and continues token by token.
    """

    def __init__(
        self,
        tokenizer: Any,
        prompt_token_ids: Sequence[int],
        params: SamplingParams,
        *,
        use_decode_stream: bool | None = None,
        deferred: bool = False,
    ) -> None:
        self.params = params
        self.token_ids: list[int] = []
        self._text = ""
        self._decoder: _StreamDecoder | _OffsetsDecoder | None = None
        self._stop: list[str] = list(params.stop or ()) if params.detokenize else []
        self._tokenizer = tokenizer
        self._prompt_token_ids = prompt_token_ids
        # Deferred decoding: ids recorded, text decoded at the first read (`_resolve`); the
        # number of recorded ids whose text counts (a token-level stop's own text is left out).
        self._deferred = False
        self._text_ids = 0
        if params.detokenize:
            stream_ok = DecodeStream is not None and hasattr(tokenizer, "backend_tokenizer")
            if use_decode_stream and not stream_ok:
                raise ValueError(
                    "use_decode_stream=True needs tokenizers>=0.21 and a fast tokenizer "
                    f"(with backend_tokenizer); got {type(tokenizer).__name__}"
                )
            if stream_ok and use_decode_stream is not False:
                # Stop strings need the text as it grows; special tokens kept as text need the
                # stream decoder's own joining rules: both decode token by token.
                self._deferred = deferred and not self._stop and params.skip_special_tokens
                if not self._deferred:
                    self._decoder = _StreamDecoder(tokenizer, prompt_token_ids, params)
            else:
                self._decoder = _OffsetsDecoder(tokenizer, prompt_token_ids, params)

        # Characters held back from streamed deltas: a stop string's first len-1 characters could
        # already be in the text. With include_stop_str_in_output the stop string is emitted
        # anyway (and nothing after it ever is), so nothing needs holding back.
        self._hold_back = (
            max(len(s) for s in self._stop) - 1 if self._stop and not params.include_stop_str_in_output else 0
        )
        self._emitted = 0  # characters of output_text already returned as deltas
        self._searched = 0  # stop strings are matched only where they end past this offset
        self._stop_string: str | None = None
        self._finished = False
        self._tail_flushed = False

    # ------------------------------------------------------------------ state

    @property
    def output_text(self) -> str:
        """All text so far (held-back characters included; truncated at a matched stop string)."""
        if self._deferred:
            self._resolve()
        return self._text

    @property
    def visible_text(self) -> str:
        """The text safe to show while streaming: output_text minus the held-back tail until finished."""
        if self._deferred:
            self._resolve()
        if self._finished or not self._hold_back:
            return self._text
        return self._text[: max(0, len(self._text) - self._hold_back)]

    @property
    def stop_string(self) -> str | None:
        """The stop string that ended the sequence, if one did."""
        return self._stop_string

    @property
    def finished(self) -> bool:
        """True once a stop string matched, a stop token ended the sequence, or flush() ran."""
        return self._finished

    # ------------------------------------------------------------------ streaming

    def update(self, new_token_ids: Sequence[int], stop_terminated: bool = False) -> str:
        """Add newly sampled tokens; return the text delta that is safe to stream now.

        Stop strings from `params.stop` are checked here (see `check_stop_strings`); when one
        matches, the sequence is finished and the delta runs up to the truncation point.
        stop_terminated: the last token is EOS or a stop token id (the engine's token-level stop);
        its text is left out unless include_stop_str_in_output, and held-back text is released.
        """
        if self._finished:
            return ""
        if self._deferred:
            self.token_ids.extend(new_token_ids)
            drop = stop_terminated and bool(new_token_ids) and not self.params.include_stop_str_in_output
            self._text_ids = len(self.token_ids) - int(drop)
            self._finished = stop_terminated
            return ""
        ids = list(new_token_ids)
        skipped: int | None = None
        if stop_terminated and ids and not self.params.include_stop_str_in_output:
            skipped = ids.pop()
        min_tokens = self.params.min_tokens
        for tid in ids:
            self.token_ids.append(tid)
            if self._decoder is not None:
                self._text += self._decoder.step(tid)
            if len(self.token_ids) <= min_tokens:
                # Text of the first min_tokens tokens cannot end a match (vLLM's min_tokens rule).
                self._searched = len(self._text)
        if skipped is not None:
            self.token_ids.append(skipped)

        if self._stop and len(self.token_ids) > min_tokens:
            self.check_stop_strings(self._stop, self.params.include_stop_str_in_output)
        if stop_terminated:
            self._finished = True
        return self._next_delta()

    def flush(self) -> str:
        """Finish the sequence (EOS, length, abort): return the held-back text not yet streamed.

        That includes the decoder's tail: a sequence that ends inside a multi-byte character
        ends with the text `tokenizer.decode` gives for it (U+FFFD), not without those tokens.
        """
        if self._deferred:
            self._finished = True
            return ""
        if self._decoder is not None and self._stop_string is None and not self._tail_flushed:
            self._tail_flushed = True
            self._text += self._decoder.flush()
            if self._stop and len(self.token_ids) > self.params.min_tokens:
                self.check_stop_strings(self._stop, self.params.include_stop_str_in_output)
        self._finished = True
        return self._next_delta()

    def _resolve(self) -> None:
        """Decode the deferred ids: once finished, the whole text in one `tokenizer.decode` of
        prompt context + ids (the context's own text cut off, as `_StreamDecoder.flush` does);
        before that, or where the context's text is not a prefix of the joined text, the stream
        decoder replayed over the ids, which then goes on token by token."""
        self._deferred = False
        ids = self.token_ids[: self._text_ids]
        tok = self._tokenizer
        if self._finished:
            context = list(_StreamDecoder._prompt_context(tok, self._prompt_token_ids))
            kwargs = {"skip_special_tokens": True, "clean_up_tokenization_spaces": False}
            head = tok.decode(context, **kwargs) if context else ""
            full = tok.decode(context + ids, **kwargs)
            if full.startswith(head):
                self._text = full[len(head) :]
                self._emitted = len(self._text)
                self._tail_flushed = True
                return
        self._decoder = _StreamDecoder(tok, self._prompt_token_ids, self.params)
        self._text = "".join(self._decoder.step(t) for t in ids)
        if self._finished:
            self._text += self._decoder.flush()
            self._tail_flushed = True
        self._emitted = len(self._text)

    def _next_delta(self) -> str:
        end = len(self._text) if self._finished else len(self._text) - self._hold_back
        if end <= self._emitted:
            return ""
        delta = self._text[self._emitted : end]
        self._emitted = end
        return delta

    # ------------------------------------------------------------------ stop strings

    def check_stop_strings(self, stop: Sequence[str], include_stop_str_in_output: bool) -> str | None:
        """Search the new text for stop strings; on a match truncate output_text and return it.

        Only matches that end in text added since the previous check are looked for (the tail
        plus len(stop string) - 1 characters of overlap), so the cost per call is bounded by the
        new text, not the whole output. With several matches the earliest in the text wins.
        Once a stop string has matched, returns it again on every call.
        Truncation: before the stop string, or after it with include_stop_str_in_output.
        """
        if self._stop_string is not None:
            return self._stop_string
        text = self._text
        if len(text) <= self._searched or not stop:
            return None
        best_index = -1
        best: str | None = None
        for s in stop:
            index = text.find(s, max(0, self._searched - len(s) + 1))
            if index != -1 and (best is None or index < best_index):
                best_index, best = index, s
        self._searched = len(text)
        if best is None:
            return None
        end = best_index + len(best) if include_stop_str_in_output else best_index
        # Never cut into what was already streamed (possible only when `stop` differs from the
        # params' stop strings that sized the hold-back).
        self._text = text[: max(end, self._emitted)]
        self._stop_string = best
        self._finished = True
        return best


def decode_logprob_token(tokenizer: Any, token_id: int) -> str | None:
    """The text shown for one token in a logprobs entry (vLLM: `tokenizer.decode([id])`).

    Special tokens are shown as themselves; a token that is part of a multi-byte character
    decodes to U+FFFD, as in vLLM. An id outside the tokenizer's vocabulary gives "". Without a
    tokenizer (`skip_tokenizer_init`) there is no text: None, as vLLM's `decoded_token`.
    """
    if tokenizer is None:
        return None
    try:
        text = tokenizer.decode([token_id])
    except (IndexError, KeyError, OverflowError, TypeError, ValueError):
        return ""
    return text or ""
