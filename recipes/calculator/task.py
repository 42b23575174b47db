"""The calculator task: arithmetic a tiny model cannot do in its head, but can with a tool.

Run the two stages from the repository root (docs in the README, "Agent RL")::

    nexrl-async run recipes/calculator/sft.toml --output runs/calculator_sft
    nexrl-async run recipes/calculator/rl.toml --output runs/calculator_rl

A problem is a product of two 3-digit numbers (``"423*456"``); the answer is ``=`` and the
exact value (``"=192888"``). A 2-layer model cannot multiply, so the only way to the reward is
the ``calc`` tool: call it with the expression, then copy its result::

    <user>       423*456
    <assistant>  <tool_call>{"name":"calc","arguments":{"expr":"423*456"}}</tool_call>
    <tool>       192888
    <assistant>  =192888

The factors are drawn from 317..999, so every product has 6 digits: every conversation has the
same shape, and copying is a matter of fixed offsets, which a tiny model learns in minutes.

Stage one (SFT, :func:`make_demos`) shows that conversation on a random 30% of the problems and
a bare answer from memory (``=192888``, one turn) on the rest, so the warmed-up model knows the
call format and how to copy a result but mostly answers from memory, and greedily almost always
does (its first token is ``=`` more often than ``<tool_call>``): its reward is near 0. Stage two
(GRPO, :func:`make_items`, :class:`CalculatorEvaluator`) must learn the rest: that answers from
memory are wrong and the tool call is worth making every time, and to copy without slips.
"""

from __future__ import annotations

import random
import re
from collections.abc import Iterator
from typing import Any

from nexrl_async.core.records import DataItem, EvalResult, Trajectory

_EXPR = re.compile(r"(\d{1,6})([+*])(\d{1,6})")


async def calc(expr: str) -> str:
    """Evaluate ``a+b`` or ``a*b`` on non-negative integers of up to 6 digits."""
    match = _EXPR.fullmatch(expr.strip())
    if match is None:
        raise ValueError(f"expected a+b or a*b, got {expr!r}")
    a, op, b = int(match[1]), match[2], int(match[3])
    return str(a + b if op == "+" else a * b)


def call_text(expr: str) -> str:
    """The assistant turn that calls the tool: compact Hermes JSON, as the model says it."""
    return f'<tool_call>{{"name":"calc","arguments":{{"expr":"{expr}"}}}}</tool_call>'


LOW, HIGH = 317, 999
"""Factor range: 317 * 317 = 100489 and 999 * 999 = 998001 both have 6 digits."""


def problem(rng: random.Random) -> tuple[str, str]:
    """A random ``a*b`` of two factors in ``LOW..HIGH``, and its value."""
    a, b = rng.randint(LOW, HIGH), rng.randint(LOW, HIGH)
    return f"{a}*{b}", str(a * b)


def make_items(count: int = 4096, seed: int = 0) -> Iterator[dict[str, str]]:
    """RL items: ``prompt`` (the expression) and ``answer`` (its value)."""
    rng = random.Random(seed)
    for _ in range(count):
        expr, value = problem(rng)
        yield {"prompt": expr, "answer": value}


def make_demos(
    count: int = 4096, seed: int = 0, tool_share: float = 0.3
) -> Iterator[dict[str, Any]]:
    """SFT demonstrations (``messages``): the tool conversation on ``tool_share`` of the
    problems, a bare answer on the others."""
    rng = random.Random(seed)
    for _ in range(count):
        expr, value = problem(rng)
        messages: list[dict[str, str]] = [{"role": "user", "content": expr}]
        if rng.random() < tool_share:
            messages += [
                {"role": "assistant", "content": call_text(expr)},
                {"role": "tool", "name": "calc", "content": value},
            ]
        messages.append({"role": "assistant", "content": f"={value}"})
        yield {"messages": messages}


class CalculatorEvaluator:
    """Reward 1 when the last assistant turn is ``=`` and the exact value, else 0.

    Metrics: ``correct``, ``used_tool`` (a tool result is in the conversation) and
    ``unaided_correct`` (right without the tool: a model doing it in its head).
    """

    inline = True
    """A few string comparisons: cheaper on the event loop than a thread hop."""

    def evaluate(self, item: DataItem, trajectory: Trajectory) -> EvalResult:
        answer = str(item.fields["answer"])
        said = trajectory.response_text.strip()
        correct = float(said == f"={answer}")
        used_tool = float(any(turn.role == "tool" for turn in trajectory.turns))
        return EvalResult(
            reward=correct,
            metrics={
                "correct": correct,
                "used_tool": used_tool,
                "unaided_correct": correct * (1.0 - used_tool),
            },
            ground_truth=answer,
        )
