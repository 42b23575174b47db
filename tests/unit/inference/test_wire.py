"""Decoding SGLang payloads: error bodies, finish reasons, logprob checks, version spans."""

from __future__ import annotations

import msgspec
import pytest

from nexrl_async.core.errors import EngineUnavailable, GenerationError, RequestRejected
from nexrl_async.core.records import VersionSpan
from nexrl_async.inference.client.structs import (
    FinishReason,
    GenerateResult,
    WeightVersionSpan,
    parse_version,
)
from nexrl_async.inference.client.wire import (
    decode_event,
    error_message,
    raise_error_event,
    to_result,
)


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b'{"error": "Invalid request: unknown field"}', "Invalid request: unknown field"),
        (b'{"error": {"message": "top_p must be in (0, 1], got 0.0."}}', "top_p must be in"),
        (
            b'{"object":"error","message":"timed out","type":"503","param":null,"code":503}',
            "timed out",
        ),
        (b'{"success": false, "message": "Failed to load"}', "Failed to load"),
        (b'{"detail": "Not Found"}', "Not Found"),
        (b"Cache not flushed: busy.", "Cache not flushed: busy."),
        (b"", "Bad Gateway"),
        (b"null", "Bad Gateway"),
    ],
)
def test_error_message_reads_every_sglang_error_shape(body: bytes, message: str) -> None:
    assert error_message(body, "Bad Gateway").startswith(message)


def _response(**meta: object) -> bytes:
    base: dict[str, object] = {
        "id": "r1",
        "finish_reason": {"type": "stop", "matched": 2},
        "prompt_tokens": 3,
        "completion_tokens": 2,
        "cached_tokens": 1,
        "weight_version": "7",
        "output_token_logprobs": [[-0.5, 11, None], [-0.25, 2, None]],
    }
    base.update(meta)
    return msgspec.json.encode({"text": "ab", "output_ids": [11, 2], "meta_info": base})


def test_a_finished_response_becomes_a_typed_result() -> None:
    result = to_result(decode_event(_response()), return_logprob=True)
    assert result.output_ids == [11, 2]
    assert result.output_logprobs == [-0.5, -0.25]
    assert result.finish_reason == FinishReason(type="stop", matched=2)
    assert (result.weight_version, result.weight_version_int) == ("7", 7)
    assert (result.prompt_tokens, result.completion_tokens, result.cached_tokens) == (3, 2, 1)
    assert result.rid == "r1"
    assert not result.aborted


def test_logprobs_must_cover_exactly_the_output_ids() -> None:
    bad = _response(output_token_logprobs=[[-0.5, 11, None], [-0.25, 3, None]])
    with pytest.raises(GenerationError, match="do not match"):
        to_result(decode_event(bad), return_logprob=True)


def test_a_null_output_logprob_is_a_generation_error() -> None:
    bad = _response(output_token_logprobs=[[-0.5, 11, None], [None, 2, None]])
    with pytest.raises(GenerationError, match="null logprob"):
        to_result(decode_event(bad), return_logprob=True)


def test_missing_logprobs_when_requested_is_a_generation_error() -> None:
    with pytest.raises(GenerationError, match="no logprobs"):
        to_result(decode_event(_response(output_token_logprobs=None)), return_logprob=True)


def test_completion_tokens_must_match_the_ids() -> None:
    with pytest.raises(GenerationError, match="completion_tokens=5"):
        to_result(decode_event(_response(completion_tokens=5)), return_logprob=False)


def test_unfinished_or_unknown_finish_is_a_generation_error() -> None:
    with pytest.raises(GenerationError, match="finish_reason"):
        to_result(decode_event(_response(finish_reason=None)), return_logprob=False)
    with pytest.raises(GenerationError, match="unknown finish_reason"):
        to_result(decode_event(_response(finish_reason={"type": "odd"})), return_logprob=False)


def test_garbled_json_is_a_generation_error() -> None:
    with pytest.raises(GenerationError, match="malformed"):
        decode_event(b'{"text": "ab", "output_ids": [1,')


def test_abort_finish_is_a_result_with_partial_output() -> None:
    finish = {"type": "abort", "message": "Aborted", "status_code": None, "err_type": None}
    result = to_result(decode_event(_response(finish_reason=finish)), return_logprob=True)
    assert result.aborted
    assert result.finish_reason.message == "Aborted"
    assert result.output_ids == [11, 2]


def test_abort_with_an_http_status_becomes_that_error() -> None:
    too_long = {"type": "abort", "message": "Input length (9 tokens) exceeds", "status_code": 400}
    with pytest.raises(RequestRejected, match="Input length") as info:
        to_result(decode_event(_response(finish_reason=too_long)), return_logprob=True)
    assert info.value.status_code == 400
    timeout = {"type": "abort", "message": "request timeout", "status_code": 503}
    with pytest.raises(EngineUnavailable, match="request timeout"):
        to_result(decode_event(_response(finish_reason=timeout)), return_logprob=True)


def test_error_events_map_4xx_to_rejections_and_the_rest_to_generation_errors() -> None:
    event = decode_event(b'{"error": {"message": "too long", "code": 400, "retryable": false}}')
    assert event.error is not None
    with pytest.raises(RequestRejected, match="too long"):
        raise_error_event(event.error)
    with pytest.raises(GenerationError, match="boom"):
        raise_error_event(decode_event(b'{"error": {"message": "boom", "code": 500}}').error or "")
    with pytest.raises(GenerationError, match="plain"):
        raise_error_event("plain")


def test_waiting_queue_abort_lacks_prompt_tokens() -> None:
    body = msgspec.json.encode(
        {
            "output_ids": [],
            "meta_info": {
                "id": "q",
                "finish_reason": {"type": "abort", "message": "Abort in waiting queue"},
                "completion_tokens": 0,
                "weight_version": "default",
                "output_token_logprobs": [],
            },
        }
    )
    result = to_result(decode_event(body), return_logprob=True)
    assert result.prompt_tokens is None
    assert result.cached_tokens is None
    assert result.output_ids == []
    assert result.weight_version_int is None


@pytest.mark.parametrize(
    ("label", "value"), [("7", 7), (" 12 ", 12), ("-1", -1), ("default", None), (None, None)]
)
def test_parse_version(label: str | None, value: int | None) -> None:
    assert parse_version(label) == value


def _result(ids: int, version: str, spans: list[tuple[str, int, int]]) -> GenerateResult:
    return GenerateResult(
        rid="r",
        output_ids=list(range(ids)),
        output_logprobs=None,
        finish_reason=FinishReason(type="length", length=ids),
        weight_version=version,
        weight_versions=[WeightVersionSpan(version=v, start=s, end=e) for v, s, e in spans],
    )


def test_version_spans_use_the_server_spans() -> None:
    result = _result(5, "4", [("3", 0, 2), ("4", 2, 5)])
    assert result.version_spans(fallback=0) == [
        VersionSpan(start=0, end=2, version=3),
        VersionSpan(start=2, end=5, version=4),
    ]


def test_version_spans_fall_back_and_merge() -> None:
    assert _result(3, "5", []).version_spans(fallback=0) == [VersionSpan(start=0, end=3, version=5)]
    merged = _result(4, "default", [("default", 0, 1), ("default", 1, 4)])
    assert merged.version_spans(fallback=2) == [VersionSpan(start=0, end=4, version=2)]
    assert _result(0, "1", []).version_spans(fallback=0) == []
