"""The API process's half of generation: token deltas -> text, stop strings, exact token counts."""

from __future__ import annotations

from hallm.core.engine_protocol import RequestDelta, TokenLogprobs
from hallm.core.sampling_params import SamplingParams
from hallm.entrypoints.openai.text_stream import SequenceText, engine_params
from tests.utils.tiny_models import build_tokenizer

TEXT = "Hello, world! The quick brown fox jumps over the lazy dog."


def _ids_until(tokenizer, ids: list[int], needle: str) -> int:  # type: ignore[no-untyped-def]
    """How many tokens it takes for the decoded text to contain `needle`."""
    for n in range(1, len(ids) + 1):
        if needle in tokenizer.decode(ids[:n]):
            return n
    raise AssertionError(needle)


def test_stop_string_cuts_text_and_counts_tokens_exactly() -> None:
    tok = build_tokenizer()
    ids = tok.encode(TEXT)
    params = SamplingParams(stop=["quick"], max_tokens=100)
    seq = SequenceText(tok, tok.encode("prompt"), params)
    # The engine sends everything at once (it went on past the stop string before the abort).
    update = seq.update([RequestDelta("r", ids[:5]), RequestDelta("r", ids[5:])])
    assert update.finish_reason == "stop" and update.stop_reason == "quick"
    assert update.text == "Hello, world! The "
    assert len(update.token_ids) == _ids_until(tok, ids, "quick")
    assert seq.update([RequestDelta("r", ids[:2])]).token_ids == []  # nothing after the stop


def test_streamed_text_equals_whole_text_and_eos_is_not_text() -> None:
    tok = build_tokenizer()
    ids = tok.encode(TEXT)
    params = SamplingParams(stop=["zzz"], max_tokens=100)
    seq = SequenceText(tok, tok.encode("prompt"), params)
    pieces = [seq.update([RequestDelta("r", [t])]).text for t in ids]
    last = seq.update([RequestDelta("r", [tok.eos_token_id], finish_reason="stop")])
    assert "".join(pieces) + last.text == TEXT  # held-back characters come out at the end
    assert last.finish_reason == "stop" and last.token_ids == [tok.eos_token_id]
    assert seq.num_tokens == len(ids) + 1


def test_logprobs_top_k_is_ranked_and_decoded() -> None:
    tok = build_tokenizer()
    params = SamplingParams(logprobs=2)
    seq = SequenceText(tok, [5], params)
    # As the engine sends it: the sampled token first, then the top-k without it (deduplicated).
    entry = TokenLogprobs(token_ids=[40, 41, 42], logprobs=[-0.5, -0.1, -2.0], ranks=[2, 1, 3])
    update = seq.update([RequestDelta("r", [40], logprobs=[entry], finish_reason="length")])
    (lp,) = update.logprobs or []
    assert lp.token_id == 40 and lp.logprob == -0.5 and lp.token == tok.decode([40])
    assert [t[0] for t in lp.top] == [41, 40] and lp.top[0][2] == -0.1


def test_engine_params_carry_no_text_work() -> None:
    params = SamplingParams(stop=["x"], include_stop_str_in_output=True, temperature=0.3, seed=3)
    p = engine_params(params)
    assert (p.stop, p.detokenize, p.include_stop_str_in_output) == ([], False, False)
    assert (p.temperature, p.seed) == (0.3, 3) and params.stop == ["x"]
