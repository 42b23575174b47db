"""The reverse-digits evaluator, slowed down: every sample takes ``DELAY_S`` to score.

Rollouts then outlast a train step, so a checkpoint taken between steps finds groups in flight
(their items must be replayed after a resume).
"""

from __future__ import annotations

from pathlib import Path

import anyio

from nexrl_async.core.records import DataItem, EvalResult, Trajectory
from nexrl_async.core.usercode import load_object

DELAY_S = 3.0
RECIPE_DIR = Path(__file__).parents[3] / "recipes" / "reverse_digits"


class SlowReverseEvaluator:
    def __init__(self) -> None:
        self._inner = load_object("task.py:ReverseEvaluator", RECIPE_DIR)()

    async def evaluate(self, item: DataItem, trajectory: Trajectory) -> EvalResult:
        await anyio.sleep(DELAY_S)
        result: EvalResult = self._inner.evaluate(item, trajectory)
        return result
