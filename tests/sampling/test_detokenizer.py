"""IncrementalDetokenizer on a byte-level BPE trained in the test (non-ASCII included), through
both the DecodeStream path and the prefix/read-offset fallback."""

from __future__ import annotations

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from hallm.core.detokenizer import IncrementalDetokenizer, decode_logprob_token
from hallm.core.sampling_params import SamplingParams

CORPUS = [
    "héllo 世界 🙂 wörld",
    "hello world, this is a test of the tokenizer.",
    "ünïcödé ñ 日本語のテキスト 🚀🎉",
    "stop here STOP there. The end ### done",
]
TEXT = "héllo 世界 🙂 wörld! 日本語のテキスト 🚀🎉 and then STOP there ### done 🙂"


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,  # small: emoji and CJK stay split over several byte-level tokens
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=["<eos>", "<pad>"],
    )
    tok.train_from_iterator(CORPUS * 5, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<eos>", pad_token="<pad>", clean_up_tokenization_spaces=False
    )


def stream(
    tokenizer, ids, params, use_decode_stream, prompt=None
) -> tuple[IncrementalDetokenizer, list[str]]:
    detok = IncrementalDetokenizer(
        tokenizer,
        prompt if prompt is not None else tokenizer.encode("hello"),
        params,
        use_decode_stream=use_decode_stream,
    )
    deltas = [detok.update([t]) for t in ids]
    deltas.append(detok.flush())
    return detok, deltas


PATHS = pytest.mark.parametrize("use_decode_stream", [True, False], ids=["decode_stream", "offsets"])


def test_fixture_splits_multibyte_characters(tokenizer) -> None:
    pieces = [tokenizer.decode([t]) for t in tokenizer.encode(TEXT)]
    assert any("\ufffd" in p for p in pieces)  # else the U+FFFD tests below prove nothing


@PATHS
def test_deltas_concatenate_to_full_decode(tokenizer, use_decode_stream: bool) -> None:
    ids = tokenizer.encode(TEXT)
    detok, deltas = stream(tokenizer, ids, SamplingParams(), use_decode_stream)
    assert "".join(deltas) == tokenizer.decode(ids) == TEXT
    assert detok.output_text == TEXT and detok.token_ids == ids
    assert not any("\ufffd" in d for d in deltas)


@PATHS
@pytest.mark.parametrize("skip", [True, False])
def test_special_tokens(tokenizer, use_decode_stream: bool, skip: bool) -> None:
    eos = tokenizer.eos_token_id
    ids = [*tokenizer.encode("héllo 世界"), eos, *tokenizer.encode(" 🙂 ok")]
    _, deltas = stream(tokenizer, ids, SamplingParams(skip_special_tokens=skip), use_decode_stream)
    assert "".join(deltas) == tokenizer.decode(ids, skip_special_tokens=skip)
    assert ("<eos>" in "".join(deltas)) is not skip


@PATHS
def test_prompt_with_multibyte_tail(tokenizer, use_decode_stream: bool) -> None:
    prompt = tokenizer.encode("日本語のテキスト 🚀")
    ids = tokenizer.encode(" 世界 🙂")
    _, deltas = stream(tokenizer, ids, SamplingParams(), use_decode_stream, prompt=prompt)
    assert "".join(deltas) == " 世界 🙂"


@PATHS
@pytest.mark.parametrize("include", [False, True])
def test_stop_string_spanning_tokens(tokenizer, use_decode_stream: bool, include: bool) -> None:
    ids = tokenizer.encode(TEXT)
    stop = "n STOP th"  # spans several tokens
    assert not any(stop in tokenizer.decode([t]) for t in ids)
    params = SamplingParams(stop=["never", stop], include_stop_str_in_output=include)
    detok = IncrementalDetokenizer(tokenizer, [], params, use_decode_stream=use_decode_stream)
    deltas = []
    for t in ids:
        deltas.append(detok.update([t]))
        if detok.finished:
            break
    expected = TEXT[: TEXT.index(stop) + (len(stop) if include else 0)]
    assert detok.stop_string == stop and detok.output_text == expected
    assert "".join(deltas) == expected  # streamed text never ran past the truncation point
    assert detok.check_stop_strings(params.stop, include) == stop  # idempotent once matched
    assert detok.update([ids[-1]]) == "" and detok.flush() == ""


@PATHS
def test_hold_back_never_streams_part_of_a_stop_string(tokenizer, use_decode_stream: bool) -> None:
    ids = tokenizer.encode(TEXT)
    params = SamplingParams(stop=["###"])
    detok = IncrementalDetokenizer(tokenizer, [], params, use_decode_stream=use_decode_stream)
    streamed = ""
    for t in ids:
        streamed += detok.update([t])
        assert "#" not in streamed or detok.finished
        assert detok.visible_text == streamed
        if detok.finished:
            break
    assert detok.output_text == streamed == TEXT[: TEXT.index("###")]


@PATHS
def test_hold_back_released_by_flush(tokenizer, use_decode_stream: bool) -> None:
    ids = tokenizer.encode("hello world")
    _, deltas = stream(tokenizer, ids, SamplingParams(stop=["xyzzy!"]), use_decode_stream)
    assert deltas[-1]  # flush returns the held-back tail (up to 5 characters)
    assert "".join(deltas) == "hello world"


def test_stop_string_multibyte_and_earliest_match(tokenizer) -> None:
    ids = tokenizer.encode(TEXT)
    detok, _ = stream(tokenizer, ids, SamplingParams(stop=["###", "世界"]), None)
    assert detok.stop_string == "世界" and detok.output_text == "héllo "


def test_min_tokens_defers_stop_strings(tokenizer) -> None:
    ids = tokenizer.encode("hello STOP hello STOP end")
    n_first = len(tokenizer.encode("hello STOP"))
    params = SamplingParams(stop=["STOP"], min_tokens=n_first + 1)
    detok, _ = stream(tokenizer, ids, params, None)
    assert detok.output_text == "hello STOP hello "


@pytest.mark.parametrize("include", [False, True])
def test_stop_terminated_token_text(tokenizer, include: bool) -> None:
    ids = tokenizer.encode("hello world")
    detok = IncrementalDetokenizer(tokenizer, [], SamplingParams(include_stop_str_in_output=include))
    text = detok.update(ids[:-1]) + detok.update(ids[-1:], stop_terminated=True)
    assert detok.finished and detok.token_ids == ids
    assert text == (tokenizer.decode(ids) if include else tokenizer.decode(ids[:-1]))


def test_detokenize_false(tokenizer) -> None:
    detok = IncrementalDetokenizer(tokenizer, [], SamplingParams(detokenize=False))
    assert detok.update(tokenizer.encode("hello")) == "" and detok.output_text == ""
    assert detok.token_ids == tokenizer.encode("hello")


def test_decode_logprob_token(tokenizer) -> None:
    assert decode_logprob_token(tokenizer, tokenizer.encode("hello")[0]) == tokenizer.decode(
        tokenizer.encode("hello")[:1]
    )
    assert decode_logprob_token(tokenizer, tokenizer.eos_token_id) == "<eos>"
    assert decode_logprob_token(tokenizer, 10**9) == ""


@PATHS
@pytest.mark.parametrize("skip", [True, False])
def test_flush_emits_a_tail_that_ends_inside_a_character(
    tokenizer, use_decode_stream: bool, skip: bool
) -> None:
    """A sequence cut inside a multi-byte character (max_tokens, abort) ends with the text
    `tokenizer.decode` gives for all its ids (U+FFFD for the incomplete bytes), not without it."""
    text_ids = tokenizer.encode(" 44 and 🙂 ok 日本語")
    for cut in range(1, len(text_ids) + 1):
        ids = [tokenizer.eos_token_id, *text_ids[:cut]]
        params = SamplingParams(skip_special_tokens=skip)
        detok, deltas = stream(tokenizer, ids, params, use_decode_stream)
        expected = tokenizer.decode(ids, skip_special_tokens=skip)
        assert "".join(deltas) == detok.output_text == expected, cut
    cut_inside = [c for c in range(1, len(text_ids)) if tokenizer.decode(text_ids[:c]).endswith("\ufffd")]
    assert cut_inside  # else this test proves nothing


@PATHS
def test_flush_after_eos_emits_the_tail_before_it(tokenizer, use_decode_stream: bool) -> None:
    ids = tokenizer.encode("ok 🙂")[:-1]  # ends inside the emoji
    detok = IncrementalDetokenizer(
        tokenizer, tokenizer.encode("hello"), SamplingParams(), use_decode_stream=use_decode_stream
    )
    deltas = [detok.update([t]) for t in ids]
    deltas.append(detok.update([tokenizer.eos_token_id], stop_terminated=True))
    deltas.append(detok.flush())
    assert "".join(deltas) == detok.output_text == tokenizer.decode(ids)
    assert detok.output_text.endswith("\ufffd")


@pytest.mark.parametrize("read_mid_stream", [False, True], ids=["read-at-end", "read-mid-stream"])
@pytest.mark.parametrize("ending", ["length", "eos", "eos-included", "abort-mid-character"])
def test_deferred_text_equals_the_per_token_text(tokenizer, ending: str, read_mid_stream: bool) -> None:
    """A deferred detokenizer (text decoded at its first read) gives the per-token decoder's
    text, whether it is read only at the end or already mid-stream."""
    ids = tokenizer.encode(TEXT, add_special_tokens=False)
    prompt = tokenizer.encode("Prompt: 日本", add_special_tokens=False)
    if ending == "abort-mid-character":  # the sequence ends inside 🚀's bytes
        cut = next(i for i in range(1, len(ids)) if tokenizer.decode(ids[:i]).endswith("\ufffd"))
        ids = ids[:cut]
    params = SamplingParams(include_stop_str_in_output=ending == "eos-included")
    eager = IncrementalDetokenizer(tokenizer, prompt, params)
    lazy = IncrementalDetokenizer(tokenizer, prompt, params, deferred=True)
    stop_last = ending.startswith("eos")
    for i, tid in enumerate(ids):
        last = i == len(ids) - 1
        for d in (eager, lazy):
            d.update([tid], stop_terminated=stop_last and last)
        if read_mid_stream and i == len(ids) // 2:
            assert lazy.visible_text == eager.visible_text
    for d in (eager, lazy):
        d.flush()
    assert lazy.output_text == eager.output_text
    assert lazy.token_ids == eager.token_ids
    assert lazy.output_text  # the case decodes to something


def test_deferred_needs_no_stop_strings(tokenizer) -> None:
    """Stop strings are matched as the text grows: such a sequence is decoded token by token."""
    d = IncrementalDetokenizer(tokenizer, [], SamplingParams(stop=["STOP"]), deferred=True)
    delta = "".join(d.update([t]) for t in tokenizer.encode(TEXT, add_special_tokens=False))
    assert d.stop_string == "STOP" and delta == d.output_text == TEXT[: TEXT.index("STOP")]
