"""Request validation: SGLang's messages for bad sampling values and over-long requests."""

from __future__ import annotations

import msgspec
import pytest
from transformers import PreTrainedTokenizerFast

from nexrl_async.core.errors import RequestRejected
from nexrl_async.core.token_codec import TokenCodec
from nexrl_async.inference.local.detokenizer import (
    Ending,
    IncrementalText,
    final_text,
    final_texts,
    find_stop,
)
from nexrl_async.inference.local.protocol import (
    GenerateRequest,
    Limits,
    check_prompt,
    logprob_request,
    sampling_spec,
)
from nexrl_async.inference.local.sglang_schema import SamplingParamsBody as SamplingParams

LIMITS = Limits(context_length=32, vocab_size=20)


def _reject(params: SamplingParams, prompt_len: int = 4) -> str:
    with pytest.raises(RequestRejected) as info:
        sampling_spec(params, prompt_len, LIMITS)
    assert info.value.status_code == 400
    return info.value.message


def test_sampling_values_are_checked_like_sglang() -> None:
    assert _reject(SamplingParams(top_p=0.0)) == "top_p must be in (0, 1], got 0.0."
    assert _reject(SamplingParams(top_k=0)) == "top_k must be -1 (disable) or at least 1, got 0."
    assert (
        _reject(SamplingParams(temperature=-0.5)) == "temperature must be non-negative, got -0.5."
    )
    assert _reject(SamplingParams(repetition_penalty=0.0)).startswith("repetition_penalty")
    assert _reject(SamplingParams(max_new_tokens=-1)).startswith("max_new_tokens")
    assert _reject(SamplingParams(min_new_tokens=9, max_new_tokens=8)).startswith("min_new_tokens")
    assert _reject(SamplingParams(max_new_tokens=4, logit_bias={"99": 1.0})).startswith(
        "logit_bias"
    )
    assert "not supported" in _reject(SamplingParams(max_new_tokens=4, regex="a+"))


def test_prompt_seed_and_logprob_ids_are_checked() -> None:
    assert check_prompt([1, 2], LIMITS) == [1, 2]
    for bad in ([], [1, 20], [1, True], [1, "2"]):
        with pytest.raises(RequestRejected):
            check_prompt(bad, LIMITS)
    assert _reject(SamplingParams(max_new_tokens=4, sampling_seed=2**64)).startswith(
        "sampling_seed must fit in 64 bits"
    )
    with pytest.raises(RequestRejected):
        logprob_request(True, -1, 0, [1, 25], 4, LIMITS)
    request = logprob_request(True, 0, 2, [3], 4, LIMITS)
    assert (request.input_start, request.top_n, request.token_ids) == (0, 2, (3,))
    assert not logprob_request(False, 0, 2, [99], 4, LIMITS).enabled


def test_context_length_checks() -> None:
    assert _reject(SamplingParams(), prompt_len=32) == (
        "The input (32 tokens) is longer than the model's context length (32 tokens)."
    )
    message = _reject(SamplingParams(max_new_tokens=29), prompt_len=4)
    assert message.startswith("Requested token count exceeds the model's maximum context length")
    assert "a total of 33 tokens: 4 tokens from the input messages and 29 tokens" in message
    assert sampling_spec(SamplingParams(max_new_tokens=28), 4, LIMITS).max_new_tokens == 28
    assert sampling_spec(SamplingParams(max_new_tokens=None), 4, LIMITS).max_new_tokens == 28


def test_spec_carries_the_values() -> None:
    spec = sampling_spec(
        SamplingParams(
            max_new_tokens=8,
            stop=["a", ""],
            stop_token_ids=[3],
            temperature=0.0,
            logit_bias={"5": -1},
        ),
        4,
        LIMITS,
    )
    assert spec.stop == ("a",)
    assert spec.stop_token_ids == frozenset({3})
    assert spec.greedy
    assert spec.logit_bias == {5: -1.0}


def test_schema_rejects_unknown_sampling_keys_but_not_top_level_ones() -> None:
    ok = msgspec.json.decode(b'{"input_ids": [1], "whatever": 3}', type=GenerateRequest)
    assert ok.input_ids == [1]
    with pytest.raises(msgspec.ValidationError):
        msgspec.json.decode(b'{"sampling_params": {"nope": 1}}', type=GenerateRequest)
    with pytest.raises(msgspec.ValidationError):
        msgspec.json.decode(b'{"sampling_params": {"temperature": "hot"}}', type=GenerateRequest)


def test_detokenizer(tokenizer: PreTrainedTokenizerFast) -> None:
    codec = TokenCodec(tokenizer)
    ids = [*tokenizer("12+3 = 15").input_ids[1:], tokenizer.eos_token_id]
    text = IncrementalText(codec, skip_special_tokens=True)
    added = [text.advance(ids[: i + 1]) for i in range(len(ids))]
    assert "".join(added) == text.text == "12+3 = 15"
    assert find_stop("12+3", "3", ("= ", "+3")) == "+3"
    assert find_stop("12+3 =", "=", ("+3",)) is None  # matched earlier, not by the new text
    assert find_stop("12+3 =", "", ("+3",)) is None
    stop = {"type": "stop", "matched": "+"}
    assert final_text(codec, ids, stop, skip_special_tokens=True, no_stop_trim=False) == "12"
    eos = {"type": "stop", "matched": ids[-1]}
    kept = final_text(codec, ids, eos, skip_special_tokens=False, no_stop_trim=True)
    assert kept.endswith("<eos>")
    cut = final_text(codec, ids, eos, skip_special_tokens=False, no_stop_trim=False)
    assert cut == "12+3 = 15"


def test_final_texts_of_a_step_decode_together_as_one_by_one(
    tokenizer: PreTrainedTokenizerFast,
) -> None:
    codec = TokenCodec(tokenizer)
    ids = [*tokenizer("12+3 = 15").input_ids[1:], tokenizer.eos_token_id]
    eos = {"type": "stop", "matched": ids[-1]}
    cases = [
        (ids, eos, True, False),
        (ids, eos, False, True),
        (ids, eos, False, False),
        (ids, {"type": "stop", "matched": "+"}, True, False),
        (ids[:3], {"type": "length", "length": 3}, False, False),
        ([], {"type": "length", "length": 0}, True, False),
    ]
    endings = [Ending(i, f, skip_special_tokens=s, no_stop_trim=k) for i, f, s, k in cases]
    one_by_one = [
        final_text(codec, i, f, skip_special_tokens=s, no_stop_trim=k) for i, f, s, k in cases
    ]
    assert final_texts(codec, endings) == one_by_one
    assert one_by_one == ["12+3 = 15", "12+3 = 15<eos>", "12+3 = 15", "12", "12+", ""]
