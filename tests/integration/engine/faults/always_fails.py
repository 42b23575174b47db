"""An evaluator that raises on every sample (a broken reward function)."""

from __future__ import annotations

from nexrl_async.core.records import DataItem, EvalResult, Trajectory


class Broken:
    inline = True

    def evaluate(self, item: DataItem, trajectory: Trajectory) -> EvalResult:
        raise RuntimeError("the reward service is down")
