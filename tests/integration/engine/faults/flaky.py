"""An evaluator that fails a quarter of its calls (a flaky reward service).

In each run of eight consecutive calls, two raise, at positions drawn by a seeded RNG: the
failure rate is 25% at every point of the run, and which samples fail depends on the order
the samples finish in (a group can lose none, one, or several). The others score the
reversal like the reverse-digits evaluator.
"""

from __future__ import annotations

import random

from nexrl_async.core.records import DataItem, EvalResult, Trajectory

BLOCK = 8
FAILING = 2


class FailsAQuarter:
    inline = True
    """On the event loop: calls are counted in the order they happen, no lock needed."""

    def __init__(self) -> None:
        self._rng = random.Random(0)
        self._calls = 0
        self._failing: set[int] = set()

    def evaluate(self, item: DataItem, trajectory: Trajectory) -> EvalResult:
        position = self._calls % BLOCK
        if position == 0:
            self._failing = set(self._rng.sample(range(BLOCK), FAILING))
        self._calls += 1
        if position in self._failing:
            raise ConnectionError("the reward service timed out")
        answer = str(item.fields["answer"])
        response = trajectory.response_text.strip()
        right = sum(a == b for a, b in zip(answer, response, strict=False))
        return EvalResult(reward=right / len(answer))
