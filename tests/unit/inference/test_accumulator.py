"""Stream events → deltas for cumulative, incremental and mixed SGLang streams."""

from __future__ import annotations

from typing import Any

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from nexrl_async.core.errors import GenerationError, RequestRejected
from nexrl_async.inference.client.accumulator import StreamAccumulator, delta_offset
from nexrl_async.inference.client.structs import StreamMode

TOKENS = [5, 9, 9, 4, 2]
LOGPROBS = [-0.1, -0.2, -0.3, -0.4, -0.5]


def events(
    mode: str, cuts: list[int], tokens: list[int] = TOKENS, logprobs: list[float] = LOGPROBS
) -> list[str]:
    """SGLang events ending at each cut; ``mode``: cumulative / incremental / mixed."""
    out, prev = [], 0
    for cut in cuts:
        done = cut == len(tokens)
        id_from = prev if mode in ("incremental", "mixed") else 0
        lp_from = prev if mode == "incremental" else 0
        text_from = lp_from
        meta: dict[str, Any] = {
            "id": "r",
            "finish_reason": {"type": "stop", "matched": 2} if done else None,
            "completion_tokens": cut,
            "weight_version": "3",
            "output_token_logprobs": [[logprobs[i], tokens[i], None] for i in range(lp_from, cut)],
        }
        body = {
            "text": "".join(f"<{t}>" for t in tokens[text_from:cut]),
            "output_ids": tokens[id_from:cut],
            "meta_info": meta,
        }
        out.append(msgspec.json.encode(body).decode())
        prev = cut
    return out


def run(data: list[str], mode: StreamMode = "auto") -> tuple[StreamAccumulator, list[Any]]:
    acc = StreamAccumulator(return_logprob=True, mode=mode)
    return acc, [acc.feed(d) for d in data]


@pytest.mark.parametrize("server_mode", ["cumulative", "incremental", "mixed"])
@pytest.mark.parametrize("cuts", [[1, 2, 3, 4, 5], [2, 5], [5], [0, 3, 3, 5]])
def test_auto_mode_recovers_the_tokens_of_every_server_mode(
    server_mode: str, cuts: list[int]
) -> None:
    acc, chunks = run(events(server_mode, cuts))
    assert [t for c in chunks for t in c.token_ids] == TOKENS
    assert [lp for c in chunks for lp in c.logprobs] == LOGPROBS
    assert "".join(c.text for c in chunks) == "<5><9><9><4><2>"
    assert acc.result is not None
    assert acc.result.output_ids == TOKENS
    assert acc.result.output_logprobs == LOGPROBS
    assert acc.result.text == "<5><9><9><4><2>"
    assert chunks[-1].final == acc.result
    assert chunks[-1].finish_reason is not None
    assert all(c.final is None for c in chunks[:-1])
    assert [c.completion_tokens for c in chunks] == cuts


@pytest.mark.parametrize("mode", ["cumulative", "incremental"])
def test_explicit_mode_matches_its_server(mode: StreamMode) -> None:
    acc, _ = run(events(mode, [1, 3, 5]), mode=mode)
    assert acc.result is not None
    assert acc.result.output_ids == TOKENS


def test_cumulative_event_that_rewrites_history_is_an_error() -> None:
    data = events("cumulative", [2, 5])
    bad = events("cumulative", [2, 5], tokens=[5, 8, 9, 4, 2])[1]
    acc = StreamAccumulator(return_logprob=True, mode="cumulative")
    acc.feed(data[0])
    with pytest.raises(GenerationError, match="disagrees"):
        acc.feed(bad)


def test_final_count_mismatch_is_an_error() -> None:
    data = events("incremental", [2, 5])
    broken = data[1].replace('"completion_tokens":5', '"completion_tokens":6')
    acc = StreamAccumulator(return_logprob=True)
    acc.feed(data[0])
    with pytest.raises(GenerationError):
        acc.feed(broken)


def test_error_event_ends_the_stream_with_the_mapped_error() -> None:
    acc = StreamAccumulator(return_logprob=True)
    with pytest.raises(RequestRejected, match="too long"):
        acc.feed('{"error": {"message": "too long", "code": 400}}')
    assert acc.server_done
    acc = StreamAccumulator(return_logprob=True)
    with pytest.raises(GenerationError, match="boom"):
        acc.feed('{"error": {"message": "boom"}}')


def test_events_after_the_final_one_and_foreign_indices_are_errors() -> None:
    data = events("cumulative", [5])
    acc, _ = run(data)
    with pytest.raises(GenerationError, match="after its final"):
        acc.feed(data[0])
    acc = StreamAccumulator(return_logprob=True)
    with pytest.raises(GenerationError, match="index"):
        acc.feed(data[0][:-1] + ', "index": 1}')


def test_new_tokens_without_logprobs_is_an_error() -> None:
    body = {"output_ids": [5], "meta_info": {"id": "r", "completion_tokens": 1}}
    acc = StreamAccumulator(return_logprob=True)
    with pytest.raises(GenerationError, match="no logprobs"):
        acc.feed(msgspec.json.encode(body).decode())


def test_without_logprobs_chunks_carry_none() -> None:
    acc = StreamAccumulator(return_logprob=False)
    chunks = [acc.feed(d) for d in events("incremental", [2, 5])]
    assert all(c.logprobs is None for c in chunks)
    assert acc.result is not None
    assert acc.result.output_logprobs is None


def test_result_is_none_before_the_final_event() -> None:
    acc = StreamAccumulator(return_logprob=True)
    acc.feed(events("cumulative", [2, 5])[0])
    assert acc.result is None
    assert not acc.server_done
    assert acc.token_ids == TOKENS[:2]


@given(
    tokens=st.lists(st.integers(0, 50), min_size=1, max_size=30),
    data=st.data(),
    server_mode=st.sampled_from(["cumulative", "incremental", "mixed"]),
)
def test_any_chunking_of_any_tokens_round_trips(
    tokens: list[int], data: st.DataObject, server_mode: str
) -> None:
    cuts = sorted(data.draw(st.sets(st.integers(0, len(tokens) - 1), max_size=6)))
    cuts = [*cuts, len(tokens)]
    logprobs = [-float(i) for i in range(len(tokens))]
    acc, _ = run(events(server_mode, cuts, tokens=tokens, logprobs=logprobs))
    assert acc.result is not None
    assert acc.result.output_ids == tokens
    assert acc.result.output_logprobs == logprobs


def test_delta_offset_without_a_total_uses_the_prefix() -> None:
    assert delta_offset([1, 2, 3], [1, 2], None, "auto") == 2
    assert delta_offset([3], [1, 2], None, "auto") == 0
    assert delta_offset([3], [1, 2], 3, "auto") == 0
    assert delta_offset([1, 2, 3], [1, 2], 3, "auto") == 2
