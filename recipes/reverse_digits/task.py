"""The reverse-digits task: data factories and evaluator.

Each item is a string of digits; the model must answer with the digits reversed, then EOS.
Reward = fraction of the answer's positions the response gets right. ``make_pairs`` adds a
preference pair to each item for DPO (``dpo.toml``): the reversal against a wrong answer.
"""

from __future__ import annotations

import random
from collections.abc import Iterator

from nexrl_async.core.records import DataItem, EvalResult, Trajectory


def make_items(count: int = 4096, digits: int = 2, seed: int = 0) -> Iterator[dict[str, str]]:
    """``count`` random digit strings of length ``digits`` with their reversal."""
    rng = random.Random(seed)
    for _ in range(count):
        text = "".join(rng.choice("0123456789") for _ in range(digits))
        yield {"prompt": f"<bos>{text}<sep>", "digits": text, "answer": text[::-1]}


def wrong_reversal(digits: str, rng: random.Random) -> str:
    """A wrong answer of a kind a model makes here: the digits copied unreversed (when that
    differs from the reversal), else the reversal with one position changed to another digit."""
    answer = digits[::-1]
    if digits != answer and rng.random() < 0.5:
        return digits
    position = rng.randrange(len(answer))
    other = rng.choice([d for d in "0123456789" if d != answer[position]])
    return answer[:position] + other + answer[position + 1 :]


def make_pairs(count: int = 4096, digits: int = 2, seed: int = 0) -> Iterator[dict[str, str]]:
    """:func:`make_items` with a preference pair: ``chosen`` the reversal, ``rejected`` a wrong
    answer (:func:`wrong_reversal`)."""
    rng = random.Random(seed + 1)
    for item in make_items(count=count, digits=digits, seed=seed):
        yield {**item, "chosen": item["answer"], "rejected": wrong_reversal(item["digits"], rng)}


def positional_accuracy(answer: str, response: str) -> float:
    """Fraction of the positions of ``answer`` that ``response`` gets right."""
    if not answer:
        return 0.0
    right = sum(a == b for a, b in zip(answer, response, strict=False))
    return right / len(answer)


class ReverseEvaluator:
    """Scores one sample: positional accuracy of the reversal, and exact match as a metric."""

    inline = True
    """A few string comparisons (about 2 µs): cheaper on the event loop than a thread hop."""

    def evaluate(self, item: DataItem, trajectory: Trajectory) -> EvalResult:
        answer = str(item.fields["answer"])
        response = trajectory.response_text.strip()
        reward = positional_accuracy(answer, response)
        return EvalResult(
            reward=reward,
            metrics={"exact": float(response[: len(answer)] == answer)},
            ground_truth=answer,
        )
