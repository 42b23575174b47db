"""MixtureSource: the weighted draw, exhaustion, replay, and an exact resumable cursor."""

from __future__ import annotations

import itertools
import json
import math
from collections import Counter
from pathlib import Path
from typing import Any, Literal

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nexrl_async.config.data import JsonlData, MixtureData
from nexrl_async.core.errors import DataError
from nexrl_async.core.protocols import DataSource
from nexrl_async.core.records import DataItem
from nexrl_async.data import MixtureSource, RowSource, iterate_once, open_source, source_of
from nexrl_async.data.mixture import draw_uniform

Exhaustion = Literal["stop", "rest"]


def rows(n: int, tag: str = "r") -> list[dict[str, Any]]:
    return [{"prompt": f"{tag}{i}", "answer": str(i)} for i in range(n)]


def mixture(
    sizes: dict[str, int],
    weights: list[float],
    *,
    seed: int = 0,
    exhaustion: Exhaustion = "stop",
    epochs: int = 1,
    shuffle: bool = True,
) -> MixtureSource:
    sources = [
        RowSource(rows(n, name), shuffle=shuffle, seed=i, epochs=epochs, name=name)
        for i, (name, n) in enumerate(sizes.items())
    ]
    return MixtureSource(sources, weights, seed=seed, exhaustion=exhaustion)


def drain(source: DataSource, limit: int = 1_000_000) -> list[str]:
    keys = []
    while len(keys) < limit and (item := source.next_item()) is not None:
        keys.append(item.key)
    return keys


def per_source(keys: list[str]) -> Counter[str | None]:
    return Counter(source_of(key) for key in keys)


def through_msgpack(state: dict[str, Any]) -> dict[str, Any]:
    """As a checkpoint stores the cursor (``engine.msgpack``)."""
    decoded: dict[str, Any] = msgspec.msgpack.decode(msgspec.msgpack.encode(state))
    return decoded


def test_a_mixture_is_a_data_source() -> None:
    assert isinstance(mixture({"a": 2, "b": 2}, [1, 1]), DataSource)


# ---- the weighted draw --------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1, 2, 3, 4])
def test_weights_3_to_1_draw_3_to_1_within_sampling_error(seed: int) -> None:
    """n draws with P(a) = 3/4: the count of a is Binomial(n, 3/4), so it lies within 5
    standard deviations (sqrt(n p (1 - p)) = 27.4 for n = 4000) of 3000 except with
    probability < 6e-7 per seed. Uniform 1:1 draws would give about 2000: 36 sd away."""
    n, p = 4000, 0.75
    source = mixture({"a": n, "b": n}, [3.0, 1.0], seed=seed)
    counts = per_source(drain(source, n))
    assert counts["a"] + counts["b"] == n
    sd = math.sqrt(n * p * (1 - p))
    assert abs(counts["a"] - n * p) <= 5 * sd, counts
    assert source.draws == n


def test_three_weights_pass_a_chi_square_test() -> None:
    """Weights 1:2:5 over 8000 draws: chi-square with 2 degrees of freedom stays below 27.6
    (the 1e-6 upper tail); draws ignoring the weights would score in the thousands."""
    n = 8000
    source = mixture({"a": n, "b": n, "c": n}, [1.0, 2.0, 5.0], seed=11)
    counts = per_source(drain(source, n))
    expected = {"a": n / 8, "b": n * 2 / 8, "c": n * 5 / 8}
    chi2 = sum((counts[k] - e) ** 2 / e for k, e in expected.items())
    assert chi2 < 27.6, counts


def test_consecutive_draws_are_independent() -> None:
    """Pairs of consecutive draws: P(a then a) = 9/16 with weights 3:1, not 3/4 (a
    round-robin-like pattern) and not 1 (runs)."""
    n = 6000
    keys = drain(mixture({"a": n, "b": n}, [3.0, 1.0], seed=5), n)
    names = [source_of(k) for k in keys]
    pairs = list(itertools.pairwise(names))
    aa = sum(1 for x, y in pairs if x == y == "a") / len(pairs)
    assert abs(aa - 9 / 16) < 5 * math.sqrt(9 / 16 * 7 / 16 / len(pairs))


def test_the_draw_is_a_pure_function_of_seed_and_count() -> None:
    assert draw_uniform(3, 17) == draw_uniform(3, 17)
    values = [draw_uniform(0, n) for n in range(2000)]
    assert all(0.0 <= v < 1.0 for v in values)
    assert abs(sum(values) / len(values) - 0.5) < 0.03
    first = drain(mixture({"a": 50, "b": 50}, [1, 1], seed=9))
    assert first == drain(mixture({"a": 50, "b": 50}, [1, 1], seed=9))
    assert first != drain(mixture({"a": 50, "b": 50}, [1, 1], seed=10))


def test_each_source_keeps_its_own_order() -> None:
    """Within a source, items come in that source's epoch order (its shuffle and seed)."""
    source = mixture({"a": 30, "b": 30}, [2, 1], exhaustion="rest", epochs=2)
    keys = drain(source)
    for i, name in enumerate(["a", "b"]):
        alone = RowSource(rows(30, name), shuffle=True, seed=i, epochs=2, name=name)
        assert [k for k in keys if source_of(k) == name] == drain(alone)


# ---- exhaustion -------------------------------------------------------------------------------


def test_stop_ends_the_mixture_when_a_draw_picks_an_empty_source() -> None:
    source = mixture({"a": 10, "b": 1000}, [1, 1], exhaustion="stop", seed=2)
    keys = drain(source)
    counts = per_source(keys)
    assert counts["a"] == 10  # every row of the source that ran out, once
    assert 10 < len(keys) < 1010
    assert source.exhausted
    assert source.next_item() is None
    assert source.next_item() is None
    assert source.draws == len(keys)
    # the draw that ended it picks "a" (the weights hold to the end)
    assert draw_uniform(2, source.draws) < 0.5


def test_rest_drains_every_source_epochs_times() -> None:
    source = mixture({"a": 7, "b": 40, "c": 3}, [5, 1, 1], exhaustion="rest", epochs=2)
    keys = drain(source)
    assert per_source(keys) == {"a": 14, "b": 80, "c": 6}
    assert len(set(keys)) == len(keys)  # each (epoch, row) once
    assert source.exhausted


def test_replays_come_first_do_not_count_as_draws_and_revive_an_exhausted_mixture() -> None:
    source = mixture({"a": 2, "b": 2}, [1, 1], exhaustion="rest")
    items = [source.next_item() for _ in range(4)]
    assert source.exhausted
    assert all(i is not None for i in items)
    first, second = items[2], items[0]
    assert first is not None
    assert second is not None
    source.replay(first)
    source.replay(second)
    assert not source.exhausted
    assert source.pending_replays == 2
    again = [source.next_item(), source.next_item()]
    assert again == [first, second]
    assert source.next_item() is None
    assert source.draws == 4


def test_a_key_from_no_source_is_refused() -> None:
    source = mixture({"a": 2, "b": 2}, [1, 1])
    for key in ("c/0:1", "0:1", "a/0:9", "a/x"):
        with pytest.raises(DataError):
            source.replay(DataItem(key=key, index=0, epoch=0, fields={}))


def test_bad_mixtures_are_refused() -> None:
    a, b = RowSource(rows(2), name="a"), RowSource(rows(2), name="a")
    with pytest.raises(DataError, match="unique names"):
        MixtureSource([a, b], [1, 1])
    with pytest.raises(DataError, match="unique names"):
        MixtureSource([RowSource(rows(2))], [1])
    with pytest.raises(DataError, match="one weight per source"):
        MixtureSource([a], [1, 2])
    with pytest.raises(DataError, match="> 0"):
        MixtureSource([a], [0])


# ---- the cursor -------------------------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(
    sizes=st.lists(st.integers(1, 12), min_size=1, max_size=4),
    weights=st.lists(st.floats(0.1, 10.0), min_size=4, max_size=4),
    seed=st.integers(0, 1000),
    epochs=st.integers(1, 3),
    exhaustion=st.sampled_from(["stop", "rest"]),
    cut=st.integers(0, 60),
    replay_every=st.integers(2, 9),
)
def test_a_restored_cursor_continues_with_the_uninterrupted_sequence(
    sizes: list[int],
    weights: list[float],
    seed: int,
    epochs: int,
    exhaustion: Exhaustion,
    cut: int,
    replay_every: int,
) -> None:
    """Draw ``cut`` items (replaying some), save the cursor through msgpack, restore it into a
    fresh mixture of the same sources and draw on: the sequence equals the uninterrupted one."""
    spec = {f"s{i}": n for i, n in enumerate(sizes)}
    w = weights[: len(sizes)]

    def build() -> MixtureSource:
        return mixture(spec, w, seed=seed, exhaustion=exhaustion, epochs=epochs)

    def step(source: MixtureSource, count: int | None, done: int = 0) -> list[str]:
        out: list[str] = []
        while count is None or len(out) < count:
            item = source.next_item()
            if item is None:
                break
            out.append(item.key)
            if (done + len(out)) % replay_every == 0 and source.pending_replays == 0:
                source.replay(item)  # a failed group's item comes back next
        return out

    whole = step(build(), None)
    first = build()
    head = step(first, cut)
    restored = build()
    restored.load_state_dict(through_msgpack(first.state_dict()))
    tail = step(restored, None, len(head))
    assert head + tail == whole[: len(head) + len(tail)]
    assert len(head) + len(tail) == len(whole)


def test_open_source_resumes_a_mixture_mid_epoch_from_files(tmp_path: Path) -> None:
    """The recipe path: two jsonl files opened as a mixture; the cursor saved mid-epoch of
    both sources (with a replay and an item in flight) restores into a mixture opened again."""
    for name, n in (("easy", 9), ("hard", 5)):
        text = "".join(json.dumps(r) + "\n" for r in rows(n, name))
        (tmp_path / f"{name}.jsonl").write_text(text)
    cfg = MixtureData(
        sources=[
            JsonlData(name="easy", weight=3.0, path="easy.jsonl", epochs=3, seed=1),
            JsonlData(name="hard", weight=1.0, path="hard.jsonl", epochs=3, seed=2),
        ],
        seed=42,
        required=["prompt"],
    )
    whole = open_source(cfg, base_dir=tmp_path)
    expected = drain(whole)
    live = open_source(cfg, base_dir=tmp_path)
    head = [live.next_item() for _ in range(11)]
    assert all(item is not None for item in head)
    assert isinstance(live, MixtureSource)
    cursors = live.state_dict()["sources"]
    assert all(c["position"] > 0 for c in cursors.values())  # mid-epoch in both
    in_flight = head[-1]
    assert in_flight is not None
    state = through_msgpack(live.state_dict(in_flight=[in_flight]))
    resumed = open_source(cfg, base_dir=tmp_path)
    resumed.load_state_dict(state)
    assert resumed.pending_replays == 1
    assert resumed.next_item() == in_flight  # the in-flight item is handed out again first
    rest = drain(resumed)
    assert [i.key for i in head if i is not None] + rest == expected


def test_a_cursor_for_other_sources_is_refused(tmp_path: Path) -> None:
    state = mixture({"a": 3, "b": 3}, [1, 1]).state_dict()
    with pytest.raises(DataError, match="saved for sources"):
        mixture({"a": 3, "c": 3}, [1, 1]).load_state_dict(state)
    with pytest.raises(DataError, match="dataset changed"):
        mixture({"a": 3, "b": 4}, [1, 1]).load_state_dict(state)
    with pytest.raises(DataError, match="format"):
        mixture({"a": 3, "b": 3}, [1, 1]).load_state_dict({**state, "format": 99})
    with pytest.raises(DataError, match="draws"):
        mixture({"a": 3, "b": 3}, [1, 1]).load_state_dict({**state, "draws": -1})


def test_metrics_count_each_sources_draws() -> None:
    source = mixture({"a": 100, "b": 100}, [3, 1], seed=3)
    keys = drain(source, 60)
    metrics = source.metrics()
    counts = per_source(keys)
    assert metrics["data/a/drawn"] == counts["a"]
    assert metrics["data/b/drawn"] == counts["b"]
    assert metrics["data/draws"] == 60
    assert metrics["data/a/epoch"] == 0


def test_iterate_once_gives_each_sources_pass_in_turn(tmp_path: Path) -> None:
    for name, n in (("x", 3), ("y", 2)):
        text = "".join(json.dumps(r) + "\n" for r in rows(n, name))
        (tmp_path / f"{name}.jsonl").write_text(text)
    cfg = MixtureData(
        sources=[JsonlData(name="x", path="x.jsonl"), JsonlData(name="y", path="y.jsonl")]
    )
    items = iterate_once(cfg, tmp_path)
    assert [i.key for i in items] == ["x/0:0", "x/0:1", "x/0:2", "y/0:0", "y/0:1"]
    assert [i.key for i in iterate_once(cfg, tmp_path, 4)][-1] == "y/0:0"


def test_a_required_field_is_checked_in_every_source(tmp_path: Path) -> None:
    (tmp_path / "x.jsonl").write_text('{"prompt": "1", "answer": "1"}\n')
    (tmp_path / "y.jsonl").write_text('{"question": "2"}\n')
    cfg = MixtureData(
        sources=[JsonlData(name="x", path="x.jsonl"), JsonlData(name="y", path="y.jsonl")],
        required=["prompt"],
    )
    with pytest.raises(DataError, match=r"source 'y'.*required field 'prompt'"):
        open_source(cfg, base_dir=tmp_path)
    mapped = msgspec.structs.replace(
        cfg,
        exhaustion="rest",
        sources=[
            cfg.sources[0],
            JsonlData(name="y", path="y.jsonl", fields={"prompt": "question"}),
        ],
    )
    source = open_source(mapped, base_dir=tmp_path)
    keys = {item.fields["prompt"] for item in (source.next_item(), source.next_item()) if item}
    assert keys == {"1", "2"}
