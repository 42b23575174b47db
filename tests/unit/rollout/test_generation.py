"""generate_turn: one turn from one or more segments, resumed across aborts."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nexrl_async.config.rollout import SamplingConfig
from nexrl_async.core.errors import GenerationError
from nexrl_async.core.records import VersionSpan
from nexrl_async.rollout.generation import GeneratedTurn, generate_turn

SAMPLING = SamplingConfig(temperature=0.5)


def seg(ids: list[int], finish: str, version: int, **kw: Any) -> GeneratedTurn:
    return GeneratedTurn(
        output_ids=ids,
        logprobs=[-float(i) for i in ids],
        finish_reason=finish,  # type: ignore[arg-type]
        weight_version=version,
        **kw,
    )


async def run(gen: Any, max_new_tokens: int = 10, max_resumes: int = 3) -> Any:
    return await generate_turn(
        gen,
        [1, 2, 3],
        max_new_tokens=max_new_tokens,
        sampling=SAMPLING,
        sticky_key="g:0",
        max_resumes=max_resumes,
    )


async def test_one_segment_is_one_span(scripted: Any) -> None:
    gen = scripted(lambda call: seg([7, 8, 9], "stop", 4, server="a"))
    turn = await run(gen)
    assert turn.output_ids == [7, 8, 9]
    assert turn.logprobs == [-7.0, -8.0, -9.0]
    assert turn.versions == [VersionSpan(start=0, end=3, version=4)]
    assert (turn.finish_reason, turn.resumes, turn.server, turn.weight_version) == (
        "stop",
        0,
        "a",
        4,
    )
    assert gen.calls[0].input_ids == [1, 2, 3]
    assert gen.calls[0].max_new_tokens == 10
    assert gen.calls[0].sampling is SAMPLING
    assert gen.calls[0].sticky_key == "g:0"


async def test_abort_resubmits_prefix_plus_partial_and_records_versions(scripted: Any) -> None:
    answers = [seg([7, 8], "abort", 0), seg([], "abort", 0), seg([9, 10, 11], "stop", 1)]
    gen = scripted(lambda call: answers[call.index])
    turn = await run(gen)
    assert [c.input_ids for c in gen.calls] == [[1, 2, 3], [1, 2, 3, 7, 8], [1, 2, 3, 7, 8]]
    assert [c.max_new_tokens for c in gen.calls] == [10, 8, 8]
    assert {c.sticky_key for c in gen.calls} == {"g:0"}
    assert turn.output_ids == [7, 8, 9, 10, 11]
    assert turn.logprobs == [-7.0, -8.0, -9.0, -10.0, -11.0]
    assert turn.versions == [
        VersionSpan(start=0, end=2, version=0),
        VersionSpan(start=2, end=5, version=1),
    ]
    assert turn.resumes == 2
    assert turn.weight_version == 0
    assert turn.finish_reason == "stop"


async def test_abort_that_used_the_whole_budget_is_length_without_resubmit(scripted: Any) -> None:
    gen = scripted(lambda call: seg([5, 6, 7, 8], "abort", 2))
    turn = await run(gen, max_new_tokens=4)
    assert len(gen.calls) == 1
    assert turn.finish_reason == "length"
    assert turn.output_ids == [5, 6, 7, 8]


async def test_too_many_aborts_fail(scripted: Any) -> None:
    gen = scripted(lambda call: seg([5], "abort", call.index))
    with pytest.raises(GenerationError, match="aborted 3 times"):
        await run(gen, max_resumes=2)
    assert len(gen.calls) == 3


async def test_server_spans_are_shifted_and_merged(scripted: Any) -> None:
    in_place = seg(
        [9, 10, 11],
        "stop",
        1,
        versions=[VersionSpan(start=0, end=1, version=1), VersionSpan(start=1, end=3, version=2)],
    )
    answers = [seg([7, 8], "abort", 1), in_place]
    turn = await run(scripted(lambda call: answers[call.index]))
    assert turn.versions == [
        VersionSpan(start=0, end=3, version=1),
        VersionSpan(start=3, end=5, version=2),
    ]


async def test_empty_turn_keeps_its_weight_version(scripted: Any) -> None:
    turn = await run(scripted(lambda call: seg([], "stop", 3)))
    assert turn.output_ids == []
    assert turn.weight_version == 3


@pytest.mark.parametrize(
    ("bad", "match"),
    [
        (seg(list(range(11)), "stop", 0), "11 tokens for max_new_tokens = 10"),
        (
            GeneratedTurn(
                output_ids=[1, 2], logprobs=[0.0], finish_reason="stop", weight_version=0
            ),
            "1 logprobs for 2 tokens",
        ),
        (seg([1, 2], "stop", 0, versions=[VersionSpan(start=0, end=1, version=0)]), "cover"),
        (
            seg(
                [1, 2],
                "stop",
                0,
                versions=[
                    VersionSpan(start=0, end=2, version=0),
                    VersionSpan(start=3, end=2, version=0),
                ],
            ),
            "cover",
        ),
        (seg([1], "stop", -1), "negative"),
    ],
)
async def test_contract_violations_are_generation_errors(
    scripted: Any, bad: GeneratedTurn, match: str
) -> None:
    with pytest.raises(GenerationError, match=match):
        await run(scripted(lambda call: bad))


@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(min_value=0, max_value=30),
    cuts=st.lists(st.integers(min_value=0, max_value=30), max_size=4),
)
async def test_any_abort_split_reassembles_the_same_turn(n: int, cuts: list[int]) -> None:
    """However a turn of n tokens is cut by aborts, the result is the whole turn with spans
    tiling it and one version per segment."""
    whole = list(range(100, 100 + n))
    bounds = sorted({min(c, n) for c in cuts})
    pieces = [whole[a:b] for a, b in zip([0, *bounds], [*bounds, n], strict=True)]

    class Pieces:
        calls = 0

        async def generate(self, input_ids: list[int], **kw: Any) -> GeneratedTurn:
            i = self.calls
            self.calls += 1
            done = sum(len(p) for p in pieces[:i])
            assert input_ids == [1, 2, 3, *whole[:done]]
            last = i == len(pieces) - 1
            return seg(pieces[i], "stop" if last else "abort", i)

    turn = await run(Pieces(), max_new_tokens=40, max_resumes=len(pieces))
    assert turn.output_ids == whole
    assert turn.logprobs == [-float(t) for t in whole]
    assert [s.start for s in turn.versions[1:]] == [s.end for s in turn.versions[:-1]]
    if n:
        assert (turn.versions[0].start, turn.versions[-1].end) == (0, n)
        assert [s.version for s in turn.versions] == [i for i, p in enumerate(pieces) if p]
    assert turn.resumes == len(pieces) - 1
