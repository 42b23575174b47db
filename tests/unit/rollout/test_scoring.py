"""Evaluator glue (sync/async/function evaluators, result vetting) and failure classification."""

from __future__ import annotations

import math
import threading
from typing import Any

import pytest

from nexrl_async.core.errors import (
    DataError,
    EngineUnavailable,
    GenerationError,
    InferenceError,
    RequestRejected,
    UserCodeError,
)
from nexrl_async.core.records import DataItem, EvalResult, FailureReason, Trajectory, VersionToken
from nexrl_async.rollout.faults import SampleFailed, classify
from nexrl_async.rollout.scoring import as_evaluate_fn, score, vet_result

ITEM = DataItem(key="0:0", index=0, epoch=0, fields={"answer": "2"})
TRAJ = Trajectory(
    group_id="g", item_key="0:0", sample_index=0, token=VersionToken(lease_id=0, version=0)
)


class SyncEvaluator:
    def __init__(self) -> None:
        self.threads: list[int] = []

    def evaluate(self, item: DataItem, trajectory: Trajectory) -> EvalResult:
        self.threads.append(threading.get_ident())
        return EvalResult(reward=1.0, metrics={"m": 2})


class AsyncEvaluator:
    async def evaluate(self, item: DataItem, trajectory: Trajectory) -> EvalResult:
        return EvalResult(reward=0.5)


def plain_function(item: DataItem, trajectory: Trajectory) -> float:
    return 0.25


async def test_sync_evaluators_run_in_a_worker_thread() -> None:
    ev = SyncEvaluator()
    result = await score(as_evaluate_fn(ev), ITEM, TRAJ)
    assert result == EvalResult(reward=1.0, metrics={"m": 2.0})
    assert isinstance(result.metrics["m"], float)
    assert ev.threads
    assert ev.threads[0] != threading.get_ident()


class InlineEvaluator(SyncEvaluator):
    inline = True


def inline_function(item: DataItem, trajectory: Trajectory) -> float:
    inline_function.threads.append(threading.get_ident())  # type: ignore[attr-defined]
    return 0.75


inline_function.inline = True  # type: ignore[attr-defined]
inline_function.threads = []  # type: ignore[attr-defined]


async def test_evaluators_that_declare_inline_run_on_the_event_loop() -> None:
    ev = InlineEvaluator()
    assert (await score(as_evaluate_fn(ev), ITEM, TRAJ)).reward == 1.0
    assert ev.threads == [threading.get_ident()]
    assert (await score(as_evaluate_fn(inline_function), ITEM, TRAJ)).reward == 0.75
    assert inline_function.threads == [threading.get_ident()]  # type: ignore[attr-defined]


async def test_a_truthy_inline_that_is_not_true_keeps_the_thread() -> None:
    class Vague(SyncEvaluator):
        inline = "yes"

    ev = Vague()
    await score(as_evaluate_fn(ev), ITEM, TRAJ)
    assert ev.threads[0] != threading.get_ident()


async def test_async_evaluators_and_functions() -> None:
    assert (await score(as_evaluate_fn(AsyncEvaluator()), ITEM, TRAJ)).reward == 0.5
    assert (await score(as_evaluate_fn(plain_function), ITEM, TRAJ)).reward == 0.25


async def test_what_the_evaluator_raises_passes_through() -> None:
    def bad(item: DataItem, trajectory: Trajectory) -> float:
        raise KeyError("answer")

    with pytest.raises(KeyError):
        await score(as_evaluate_fn(bad), ITEM, TRAJ)


def test_objects_without_evaluate_are_rejected() -> None:
    with pytest.raises(UserCodeError, match="evaluate"):
        as_evaluate_fn(object())


@pytest.mark.parametrize("value", [True, 3, 0.5])
def test_numbers_are_rewards(value: Any) -> None:
    assert vet_result(value) == EvalResult(reward=float(value))


@pytest.mark.parametrize(
    ("result", "match"),
    [
        (math.nan, "reward is nan"),
        (EvalResult(reward=math.inf), "reward is inf"),
        (EvalResult(reward="1.0"), "reward is str"),  # type: ignore[arg-type]
        (None, "NoneType"),
        ({"reward": 1.0}, "dict"),
        (EvalResult(reward=1.0, metrics={"a": "x"}), "metric 'a' is str"),  # type: ignore[dict-item]
        (EvalResult(reward=1.0, metrics={"a": math.nan}), "metric 'a' is nan"),
        (EvalResult(reward=1.0, metrics=[1.0]), "dict of floats"),  # type: ignore[arg-type]
    ],
)
def test_invalid_results(result: Any, match: str) -> None:
    with pytest.raises(SampleFailed, match=match) as info:
        vet_result(result)
    assert info.value.reason is FailureReason.INVALID_REWARD


@pytest.mark.parametrize(
    ("err", "stage", "reason"),
    [
        (SampleFailed(FailureReason.TIMEOUT, "x"), "generate", FailureReason.TIMEOUT),
        (DataError("no field"), "item", FailureReason.BAD_ITEM),
        (DataError("no field"), "format", FailureReason.BAD_ITEM),
        (ValueError("x"), "format", FailureReason.FORMAT_ERROR),
        (DataError("x"), "render", FailureReason.FORMAT_ERROR),
        (RequestRejected(400, "too long"), "generate", FailureReason.PROMPT_REJECTED),
        (EngineUnavailable("down"), "generate", FailureReason.ENGINE_UNAVAILABLE),
        (GenerationError("cut"), "generate", FailureReason.GENERATION_ERROR),
        (InferenceError("other"), "generate", FailureReason.GENERATION_ERROR),
        (RuntimeError("bug"), "generate", FailureReason.INTERNAL),
        (RuntimeError("bug"), "hooks", FailureReason.INTERNAL),
        (TypeError("x"), "tools", FailureReason.TOOL_ERROR),
        (RequestRejected(400, "judge"), "evaluate", FailureReason.EVALUATOR_ERROR),
    ],
)
def test_classify(err: Exception, stage: Any, reason: FailureReason) -> None:
    got, detail = classify(err, stage)
    assert got is reason
    assert detail
