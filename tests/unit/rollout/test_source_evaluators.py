"""Per-source evaluators: a mixture source's ``evaluator`` scores its items, the rest fall back."""

from __future__ import annotations

import textwrap
import threading
from pathlib import Path
from typing import Any

import msgspec

from nexrl_async.config.data import JsonlData, MixtureData, source_evaluators
from nexrl_async.rollout.loading import load_worker

CODE = """
import threading
from nexrl_async.core.records import EvalResult

class Default:
    def evaluate(self, item, trajectory):
        return EvalResult(reward=0.25, metrics={"which": 0.0})

class Lengthy:
    def evaluate(self, item, trajectory):
        main = float(threading.current_thread() is threading.main_thread())
        reward = float(len(trajectory.response_text))
        return EvalResult(reward=reward, metrics={"which": 1.0, "on_main": main})

async def exact(item, trajectory):
    return EvalResult(reward=float(trajectory.response_text == "42"), metrics={"which": 2.0})
"""


async def test_each_source_is_scored_by_its_own_evaluator(
    tmp_path: Path, cfg: Any, tok: Any, scripted: Any, says: Any, item: Any, token: Any
) -> None:
    (tmp_path / "code.py").write_text(textwrap.dedent(CODE))
    worker = load_worker(
        cfg(evaluator="code.py:Default"),
        tokenizer=tok,
        generator=scripted(lambda call: says("42")),
        base_dir=tmp_path,
        source_evaluators={"long": "code.py:Lengthy", "math": "code.py:exact"},
    )
    scored = {}
    group_metrics = {}
    for key in ("long/0:0", "math/1:3", "other/0:0", "0:7"):
        group = await worker.run_group(
            msgspec.structs.replace(item(), key=key), token, group_id=f"g-{key}"
        )
        assert group.ok
        scored[key] = (group.rewards[0], group.trajectories[0].metrics["which"])
        group_metrics[key] = group.trajectories[0].metrics
    assert scored == {
        "long/0:0": (2.0, 1.0),  # the sync evaluator of "long", in a worker thread
        "math/1:3": (1.0, 2.0),  # the async one of "math"
        "other/0:0": (0.25, 0.0),  # a source without its own: rollout.evaluator
        "0:7": (0.25, 0.0),
    }
    assert threading.current_thread() is threading.main_thread()
    assert group_metrics["long/0:0"]["on_main"] == 0.0  # a sync evaluator keeps its thread


def test_validation_sources_fall_back_on_the_training_sources_evaluators() -> None:
    train = MixtureData(
        sources=[
            JsonlData(name="a", path="a.jsonl", evaluator="x.py:A"),
            JsonlData(name="b", path="b.jsonl"),
        ]
    )
    val = MixtureData(
        sources=[
            JsonlData(name="a", path="va.jsonl"),
            JsonlData(name="b", path="vb.jsonl", evaluator="x.py:VB"),
            JsonlData(name="c", path="vc.jsonl"),
        ]
    )
    assert source_evaluators(train) == {"a": "x.py:A"}
    assert source_evaluators(val, fallback=source_evaluators(train)) == {
        "a": "x.py:A",
        "b": "x.py:VB",
    }
    assert source_evaluators(JsonlData(path="a.jsonl")) == {}
    assert source_evaluators(None) == {}
