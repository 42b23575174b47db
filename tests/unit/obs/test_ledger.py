from __future__ import annotations

import json
import math
import time
import typing
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import anyio
import pytest

from nexrl_async.core.errors import DataError
from nexrl_async.core.records import FailureReason, Status
from nexrl_async.obs import (
    Admitted,
    Checkpointed,
    Dropped,
    Event,
    Failed,
    Pooled,
    Published,
    RunFinished,
    RunLedger,
    RunResumed,
    RunStarted,
    Scored,
    Trained,
    TurnGenerated,
    Validated,
    read_events,
)


def one_of_each() -> list[Event]:
    return [
        RunStarted(config_hash="abc123", resumed_from=None),
        RunResumed(step=4, path="ckpt/step_4"),
        Admitted(lease_id=3, version=1, item_key="0:17", group_id="g3"),
        TurnGenerated(
            group_id="g3", sample_index=1, turn=0, n_tokens=42, weight_version=1, server="s0"
        ),
        Scored(group_id="g3", sample_index=1, reward=0.5, status=Status.OK),
        Scored(
            group_id="g3",
            sample_index=2,
            reward=0.0,
            status=Status.FAILED,
            failure=FailureReason.TIMEOUT,
        ),
        Pooled(group_id="g3", head_version=1),
        Trained(
            step=2,
            group_ids=["g3", "g4"],
            item_keys=["0:17", "0:18"],
            head_versions=[1, 2],
            staleness=[1, 0],
            policy_version=3,
        ),
        Dropped(group_id="g5", item_key="0:19", reason="overdue"),
        Failed(
            group_id="g6",
            item_key="0:20",
            reasons=[FailureReason.ENGINE_UNAVAILABLE, FailureReason.EVALUATOR_ERROR],
        ),
        Published(
            version=3, transport="disk", bytes=1 << 20, transfer_s=0.25, pause_s=0.1, servers=["s0"]
        ),
        Validated(step=2, metrics={"val/reward_mean": 0.75}),
        Checkpointed(step=2, path="ckpt/step_2"),
        RunFinished(reason="completed", step=3),
    ]


def test_every_event_type_round_trips(tmp_path: Path) -> None:
    events = one_of_each()
    assert {type(e) for e in events} == set(typing.get_args(Event)), "add the new event here"
    path = tmp_path / "events.jsonl"
    with RunLedger(path) as ledger:
        for event in events:
            ledger.emit(event)
    assert read_events(path) == events


def test_lines_are_tagged_json(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    with RunLedger(path) as ledger:
        ledger.emit(Pooled(group_id="g1", head_version=0))
    (line,) = path.read_text().splitlines()
    assert json.loads(line) == {
        "event": "pooled",
        "group_id": "g1",
        "head_version": 0,
        "time": pytest.approx(time.time(), abs=60),
    }


def test_events_are_stamped_when_built() -> None:
    before = time.time()
    event = Checkpointed(step=1, path="p")
    assert before <= event.time <= time.time()


def test_non_finite_floats_come_back_as_none(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    with RunLedger(path) as ledger:
        ledger.emit(Scored(group_id="g", sample_index=0, reward=math.nan, status=Status.OK))
        ledger.emit(Validated(step=0, metrics={"val/a": math.inf, "val/b": 1.0}))
    scored, validated = read_events(path)
    assert isinstance(scored, Scored)
    assert scored.reward is None
    assert isinstance(validated, Validated)
    assert validated.metrics == {"val/a": None, "val/b": 1.0}


def test_each_emit_is_on_disk_before_close(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    ledger = RunLedger(path)
    ledger.emit(RunStarted(config_hash="h"))
    assert read_events(path) == [RunStarted(config_hash="h", time=read_events(path)[0].time)]
    ledger.close()


def test_per_sample_events_reach_disk_with_the_next_step_event(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    ledger = RunLedger(path)
    ledger.emit(RunStarted(config_hash="h"))
    scored = Scored(group_id="g", sample_index=0, reward=1.0, status=Status.OK)
    ledger.emit(scored)
    ledger.emit(Pooled(group_id="g", head_version=0))
    assert [type(e) for e in read_events(path)] == [RunStarted], "lazy lines wait"
    ledger.emit(Checkpointed(step=0, path="p"))
    assert [type(e) for e in read_events(path)] == [RunStarted, Scored, Pooled, Checkpointed]
    ledger.emit(scored)
    ledger.close()
    assert [type(e) for e in read_events(path)][-1] is Scored, "close flushes"


def test_lazy_events_wait_at_most_the_flush_interval(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from nexrl_async.obs import jsonlines

    now = [100.0]
    monkeypatch.setattr(jsonlines.time, "monotonic", lambda: now[0])
    path = tmp_path / "events.jsonl"
    ledger = RunLedger(path)
    ledger.emit(Admitted(lease_id=1, version=0, item_key="0:1", group_id="g"))
    assert read_events(path) == []
    now[0] += jsonlines.LAZY_FLUSH_S
    ledger.emit(Admitted(lease_id=2, version=0, item_key="0:2", group_id="g2"))
    assert [e.lease_id for e in read_events(path) if isinstance(e, Admitted)] == [1, 2]
    ledger.close()


def test_threads_writing_at_once_give_whole_lines(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    n_threads, per_thread = 8, 300

    def write(thread: int) -> None:
        for i in range(per_thread):
            ledger.emit(Pooled(group_id=f"t{thread}-{i}", head_version=i))

    with RunLedger(path) as ledger, ThreadPoolExecutor(n_threads) as pool:
        list(pool.map(write, range(n_threads)))
    events = read_events(path)  # raises on any garbled line
    assert len(events) == n_threads * per_thread
    for thread in range(n_threads):
        mine = [e for e in events if isinstance(e, Pooled) and e.group_id.startswith(f"t{thread}-")]
        assert [e.head_version for e in mine] == list(range(per_thread))


async def test_loop_and_worker_threads_share_one_ledger(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    limiter = anyio.CapacityLimiter(4)
    with RunLedger(path) as ledger:

        def emit_from_worker(i: int) -> None:
            ledger.emit(Checkpointed(step=i, path="worker"))

        async def in_thread(i: int) -> None:
            await anyio.to_thread.run_sync(emit_from_worker, i, limiter=limiter)

        async with anyio.create_task_group() as tg:
            for i in range(4):
                tg.start_soon(in_thread, i)
            ledger.emit(Checkpointed(step=99, path="loop"))
    paths = sorted(e.path for e in read_events(path) if isinstance(e, Checkpointed))
    assert paths == ["loop"] + ["worker"] * 4


def test_resume_appends_and_never_truncates(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    with RunLedger(path) as ledger:
        ledger.emit(RunStarted(config_hash="h"))
        ledger.emit(Checkpointed(step=1, path="c1"))
    with RunLedger(path) as ledger:
        ledger.emit(RunResumed(step=1, path="c1"))
    assert [type(e) for e in read_events(path)] == [RunStarted, Checkpointed, RunResumed]


def test_a_torn_last_line_is_ended_on_resume_and_skipped_on_read(
    tmp_path: Path, log_messages: list[str]
) -> None:
    path = tmp_path / "events.jsonl"
    with RunLedger(path) as ledger:
        ledger.emit(Pooled(group_id="g1", head_version=0))
    with path.open("ab") as file:
        file.write(b'{"event":"pooled","group_')  # the writer was killed mid-line
    with RunLedger(path) as ledger:
        ledger.emit(Pooled(group_id="g2", head_version=1))
    events = read_events(path)
    assert [e.group_id for e in events if isinstance(e, Pooled)] == ["g1", "g2"]
    assert any("torn line" in m and ":2" in m for m in log_messages)


def test_a_well_formed_unknown_event_is_a_data_error(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    path.write_text(
        '{"event":"pooled","group_id":"g","head_version":0,"time":1.0}\n'
        '{"event":"exploded","time":1.0}\n'
    )
    with pytest.raises(DataError, match=r"events\.jsonl:2"):
        read_events(path)


def test_emit_after_close_is_dropped_with_one_warning(
    tmp_path: Path, log_messages: list[str]
) -> None:
    path = tmp_path / "events.jsonl"
    ledger = RunLedger(path)
    ledger.close()
    ledger.emit(Pooled(group_id="late", head_version=0))
    ledger.emit(Pooled(group_id="later", head_version=0))
    assert read_events(path) == []
    assert sum("closed" in m for m in log_messages) == 1
