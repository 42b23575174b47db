"""An evaluator that fails a quarter of its calls (a flaky reward service).

Exactly one call in each run of four consecutive calls raises, at a position drawn by a
seeded RNG: the failure rate is 25% at every point of the run, and which samples fail depends
on the order the samples finish in (groups can lose none, one or several). The others score
the reversal like the reverse-digits evaluator.
"""

from __future__ import annotations

import random

from nexrl_async.core.records import DataItem, EvalResult, Trajectory


class FailsAQuarter:
    inline = True
    """On the event loop: calls are counted in the order they happen, no lock needed."""

    def __init__(self) -> None:
        self._rng = random.Random(0)
        self._calls = 0
        self._failing = 0

    def evaluate(self, item: DataItem, trajectory: Trajectory) -> EvalResult:
        position = self._calls % 4
        if position == 0:
            self._failing = self._rng.randrange(4)
        self._calls += 1
        if position == self._failing:
            raise ConnectionError("the reward service timed out")
        answer = str(item.fields["answer"])
        response = trajectory.response_text.strip()
        right = sum(a == b for a, b in zip(answer, response, strict=False))
        return EvalResult(reward=right / len(answer))
