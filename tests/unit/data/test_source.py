"""RowSource: field mapping, shuffling, epochs, replay, and an exact resumable cursor."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nexrl_async.config.data import JsonlData
from nexrl_async.core.errors import DataError
from nexrl_async.core.protocols import DataSource
from nexrl_async.core.records import DataItem
from nexrl_async.data import RowSource, iterate_once, map_fields, missing_fields, open_source


def make_rows(n: int) -> list[dict[str, Any]]:
    return [{"q": f"q{i}", "a": str(i)} for i in range(n)]


def drain(source: RowSource) -> list[str]:
    keys = []
    while (item := source.next_item()) is not None:
        keys.append(item.key)
    return keys


def jsonl_cfg(tmp_path: Path, rows: list[dict[str, Any]], **kw: Any) -> JsonlData:
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return JsonlData(path=str(path), **kw)


def test_row_source_is_a_data_source() -> None:
    assert isinstance(RowSource(make_rows(2)), DataSource)


# ---- field mapping and required fields --------------------------------------------------------


def test_map_fields_renames_mapped_columns_and_keeps_the_rest() -> None:
    row = {"question": "hi", "solution": "4", "id": 7}
    out = map_fields(row, {"prompt": "question", "answer": "solution"})
    assert out == {"prompt": "hi", "answer": "4", "id": 7}
    assert map_fields(row, {"prompt": "question", "text": "question"}) == {
        "prompt": "hi",
        "text": "hi",
        "solution": "4",
        "id": 7,
    }
    assert map_fields({"id": 1}, {"prompt": "question"}) == {"id": 1}


def test_field_mapping_through_open_source(tmp_path: Path) -> None:
    rows = [{"question": "1+1", "solution": "2"}]
    cfg = jsonl_cfg(tmp_path, rows, fields={"prompt": "question"}, required=["prompt"])
    item = open_source(cfg, base_dir=tmp_path).next_item()
    assert item is not None
    assert item.fields == {"prompt": "1+1", "solution": "2"}


def test_mapped_column_in_no_row_is_an_open_time_error(tmp_path: Path) -> None:
    cfg = jsonl_cfg(tmp_path, make_rows(3), fields={"prompt": "question"})
    with pytest.raises(DataError, match=r"fields.prompt = 'question', but no row has a value"):
        open_source(cfg, base_dir=tmp_path)


def test_required_field_in_no_row_is_an_open_time_error(tmp_path: Path) -> None:
    cfg = jsonl_cfg(tmp_path, make_rows(3), required=["q", "prompt"])
    with pytest.raises(DataError, match=r"required field 'prompt' has a value in no row"):
        open_source(cfg, base_dir=tmp_path)


def test_rows_missing_required_fields_are_handed_out_and_flagged(tmp_path: Path) -> None:
    rows: list[dict[str, Any]] = [{"q": "a", "a": "1"}, {"q": "b"}, {"q": None, "a": "3"}]
    cfg = jsonl_cfg(tmp_path, rows, required=["q", "a"], shuffle=False)
    source = open_source(cfg, base_dir=tmp_path)
    items = [source.next_item() for _ in range(3)]
    assert [source.missing_fields(i) for i in items if i is not None] == [[], ["a"], ["q"]]
    assert source.next_item() is None


def test_missing_fields_accepts_plain_mappings() -> None:
    assert missing_fields({"a": 1, "b": None}, ["a", "b", "c"]) == ["b", "c"]
    item = DataItem(key="0:0", index=0, epoch=0, fields={"a": 1})
    assert missing_fields(item, ["a"]) == []


# ---- order, shuffle, epochs, exhaustion -------------------------------------------------------


def test_unshuffled_epochs_in_file_order() -> None:
    source = RowSource(make_rows(3), epochs=2)
    assert len(source) == 3
    assert not source.exhausted
    assert drain(source) == ["0:0", "0:1", "0:2", "1:0", "1:1", "1:2"]
    assert source.exhausted
    assert source.next_item() is None
    assert source.epoch == 2


def test_items_carry_row_index_epoch_and_a_copy_of_the_row() -> None:
    rows = make_rows(2)
    source = RowSource(rows, epochs=2)
    first = source.next_item()
    assert first is not None
    assert (first.key, first.index, first.epoch) == ("0:0", 0, 0)
    first.fields["q"] = "mutated"
    source.next_item()
    again = source.next_item()
    assert again is not None
    assert (again.key, again.fields["q"]) == ("1:0", "q0")


def test_shuffle_is_a_deterministic_per_epoch_permutation() -> None:
    a = drain(RowSource(make_rows(20), shuffle=True, seed=3, epochs=3))
    b = drain(RowSource(make_rows(20), shuffle=True, seed=3, epochs=3))
    c = drain(RowSource(make_rows(20), shuffle=True, seed=4, epochs=3))
    assert a == b
    assert a != c
    epochs = [[k.split(":")[1] for k in a if k.startswith(f"{e}:")] for e in range(3)]
    assert all(sorted(e, key=int) == [str(i) for i in range(20)] for e in epochs)
    assert epochs[0] != epochs[1]  # a fresh permutation each epoch
    assert epochs[0] != [str(i) for i in range(20)]


def test_max_items_applies_before_shuffling(tmp_path: Path) -> None:
    cfg = jsonl_cfg(tmp_path, make_rows(50), max_items=5, shuffle=True, seed=1)
    source = open_source(cfg, base_dir=tmp_path)
    assert sorted(int(k.split(":")[1]) for k in drain(source)) == [0, 1, 2, 3, 4]


def test_iterate_once_ignores_epochs_and_shuffle_unless_asked(tmp_path: Path) -> None:
    cfg = jsonl_cfg(tmp_path, make_rows(6), shuffle=True, seed=2, epochs=3)
    items = iterate_once(cfg, tmp_path)
    assert [i.key for i in items] == [f"0:{i}" for i in range(6)]
    assert [i.key for i in iterate_once(cfg, tmp_path, max_items=2)] == ["0:0", "0:1"]
    shuffled = [i.key for i in iterate_once(cfg, tmp_path, shuffle=True)]
    assert shuffled == drain(open_source(cfg, base_dir=tmp_path))[:6]
    assert iterate_once(cfg, tmp_path, max_items=0) == []
    with pytest.raises(DataError, match="max_items must be >= 0"):
        iterate_once(cfg, tmp_path, max_items=-1)


# ---- replay -----------------------------------------------------------------------------------


def test_replays_come_first_in_fifo_order() -> None:
    source = RowSource(make_rows(5))
    handed = [source.next_item() for _ in range(3)]
    a, _, c = (i for i in handed if i is not None)
    source.replay(c)
    source.replay(a)
    assert source.pending_replays == 2
    assert [source.next_item().key for _ in range(3)] == ["0:2", "0:0", "0:3"]  # type: ignore[union-attr]


def test_replay_after_exhaustion_reopens_the_source() -> None:
    source = RowSource(make_rows(1))
    item = source.next_item()
    assert item is not None
    assert source.exhausted
    source.replay(item)
    assert not source.exhausted
    again = source.next_item()
    assert again is not None
    assert again == item
    assert source.exhausted


def test_replay_of_a_foreign_item_is_rejected() -> None:
    source = RowSource(make_rows(2))
    with pytest.raises(DataError, match="names row 5 of 2"):
        source.replay(DataItem(key="0:5", index=5, epoch=0, fields={}))
    with pytest.raises(DataError, match="not of the form"):
        source.replay(DataItem(key="abc", index=0, epoch=0, fields={}))


# ---- cursor -----------------------------------------------------------------------------------


def test_state_dict_is_plain_and_round_trips_through_msgpack() -> None:
    source = RowSource(make_rows(4), shuffle=True, seed=9, epochs=2)
    handed = [source.next_item() for _ in range(5)]
    source.replay(handed[1])  # type: ignore[arg-type]
    state = source.state_dict()
    assert state == msgspec.msgpack.decode(msgspec.msgpack.encode(state))
    assert state["epoch"] == 1
    assert state["position"] == 1
    assert state["replay"] == [handed[1].key]  # type: ignore[union-attr]


def test_state_dict_saves_in_flight_items_as_replays_without_touching_the_source() -> None:
    source = RowSource(make_rows(4))
    first, second = source.next_item(), source.next_item()
    assert first is not None
    assert second is not None
    source.replay(first)
    state = source.state_dict(in_flight=[second])
    assert state["replay"] == ["0:0", "0:1"]
    assert source.pending_replays == 1
    restored = RowSource(make_rows(4))
    restored.load_state_dict(state)
    assert drain(restored) == ["0:0", "0:1", "0:2", "0:3"]


def test_resume_continues_exactly_across_an_epoch_boundary() -> None:
    def fresh() -> RowSource:
        return RowSource(make_rows(7), shuffle=True, seed=5, epochs=3)

    reference = drain(fresh())
    source = fresh()
    head = [source.next_item() for _ in range(7)]
    restored = fresh()
    restored.load_state_dict(source.state_dict())
    assert [i.key for i in head if i is not None] + drain(restored) == reference


@pytest.mark.parametrize(
    ("patch", "message"),
    [
        ({"rows": 3}, "saved for 3 rows but the source now has 4"),
        ({"format": 99}, "format 99"),
        ({"epoch": -1}, "epoch must be an integer >= 0"),
        ({"position": True}, "position must be an integer >= 0"),
        ({"position": 4}, "position 4 is past 4 rows"),
        ({"replay": "0:1"}, "replay must be a list of keys"),
        ({"replay": ["0:9"]}, "names row 9 of 4"),
    ],
)
def test_bad_cursor_is_rejected_and_leaves_the_source_unchanged(
    patch: dict[str, Any], message: str
) -> None:
    source = RowSource(make_rows(4))
    source.next_item()
    state = {**source.state_dict(), **patch}
    with pytest.raises(DataError, match=message):
        source.load_state_dict(state)
    assert source.position == 1
    assert source.pending_replays == 0


# Each op: None hands out the next item; an int k replays the k-th most recent hand-out.
ops_strategy = st.lists(st.one_of(st.none(), st.integers(0, 5)), max_size=40)


def run_ops(source: RowSource, ops: list[int | None], handed: list[DataItem]) -> list[str]:
    out: list[str] = []
    for op in ops:
        if op is None:
            item = source.next_item()
            if item is not None:
                handed.append(item)
            out.append(item.key if item is not None else "-")
        elif op < len(handed):
            source.replay(handed[-1 - op])
    return out


@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(1, 6),
    epochs=st.integers(1, 3),
    shuffle=st.booleans(),
    seed=st.integers(0, 1000),
    ops=ops_strategy,
    cut=st.integers(0, 40),
)
def test_resume_equals_the_uninterrupted_sequence(
    n: int, epochs: int, shuffle: bool, seed: int, ops: list[int | None], cut: int
) -> None:
    def fresh() -> RowSource:
        return RowSource(make_rows(n), shuffle=shuffle, seed=seed, epochs=epochs)

    uninterrupted = fresh()
    reference = run_ops(uninterrupted, ops, [])
    cut = min(cut, len(ops))
    handed: list[DataItem] = []
    first = fresh()
    head = run_ops(first, ops[:cut], handed)
    state = msgspec.msgpack.decode(msgspec.msgpack.encode(first.state_dict()))
    resumed = fresh()
    resumed.load_state_dict(state)
    tail = run_ops(resumed, ops[cut:], handed)
    assert head + tail == reference
    assert resumed.state_dict() == uninterrupted.state_dict()
    assert resumed.exhausted == uninterrupted.exhausted
