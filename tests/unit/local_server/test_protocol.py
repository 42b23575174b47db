"""Request validation: SGLang's messages for bad sampling values and over-long requests."""

from __future__ import annotations

import msgspec
import pytest
from transformers import PreTrainedTokenizerFast

from nexrl_async.core.errors import RequestRejected
from nexrl_async.inference.local.detokenizer import IncrementalText, final_text, find_stop
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
    ids = [*tokenizer("12+3 = 15").input_ids[1:], tokenizer.eos_token_id]
    text = IncrementalText(tokenizer, skip_special_tokens=True)
    added = [text.advance(ids[: i + 1]) for i in range(len(ids))]
    assert "".join(added) == text.text == "12+3 = 15"
    assert find_stop("12+3", "3", ("= ", "+3")) == "+3"
    assert find_stop("12+3 =", "=", ("+3",)) is None  # matched earlier, not by the new text
    assert find_stop("12+3 =", "", ("+3",)) is None
    stop = {"type": "stop", "matched": "+"}
    assert final_text(tokenizer, ids, stop, skip_special_tokens=True, no_stop_trim=False) == "12"
    eos = {"type": "stop", "matched": ids[-1]}
    kept = final_text(tokenizer, ids, eos, skip_special_tokens=False, no_stop_trim=True)
    assert kept.endswith("<eos>")
    cut = final_text(tokenizer, ids, eos, skip_special_tokens=False, no_stop_trim=False)
    assert cut == "12+3 = 15"
