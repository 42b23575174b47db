"""A reverse-digits variant whose data and evaluator misbehave on purpose."""

from __future__ import annotations

import math
import random
from collections.abc import Iterator

from nexrl_async.core.records import DataItem, EvalResult, Trajectory


def make_items(count: int = 400, seed: int = 0, digits: int = 2) -> Iterator[dict[str, str]]:
    """Every 4th row is broken in one of four ways (by its first digit)."""
    rng = random.Random(seed)
    for i in range(count):
        text = "".join(rng.choice("3456789") for _ in range(digits))
        kind = i % 8
        if kind == 1:
            yield {"prompt": f"<bos>{text}<sep>"}  # missing answer -> bad_item
        elif kind == 3:
            yield {"prompt": "<bos>1" + text + "<sep>", "answer": "x"}  # evaluator raises
        elif kind == 5:
            yield {"prompt": "<bos>2" + text + "<sep>", "answer": "x"}  # evaluator gives NaN
        elif kind == 7:
            long = "".join(rng.choice("3456789") for _ in range(28))
            yield {"prompt": f"<bos>{long}<sep>", "answer": "x"}  # server rejects: too long
        else:
            yield {"prompt": f"<bos>{text}<sep>", "answer": text[::-1]}


class Evaluator:
    def evaluate(self, item: DataItem, trajectory: Trajectory) -> EvalResult:
        prompt = str(item.fields["prompt"])
        if prompt.startswith("<bos>1"):
            raise RuntimeError("evaluator crashed on purpose")
        if prompt.startswith("<bos>2"):
            return EvalResult(reward=math.nan)
        answer = str(item.fields["answer"])
        response = trajectory.response_text.strip()
        return EvalResult(reward=float(response == answer))
