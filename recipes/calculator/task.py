"""The calculator task: arithmetic a tiny model cannot do in its head, but can with a tool.

Run the two stages from the repository root (docs in the README, "Agent RL")::

    nexrl-async run recipes/calculator/sft.toml --output runs/calculator_sft
    nexrl-async run recipes/calculator/rl.toml --output runs/calculator_rl

A problem is a product of two 3-digit numbers (``"423*456"``), or, on half of the problems
(``two_step_share``), that product plus a third (``"423*456+789"``); the answer is ``=`` and the
exact value. A 2-layer model cannot multiply, so the only way to the reward is the ``calc``
tool, which does one operation a call: call it, copy its result into the next call or the
answer::

    <user>       423*456+789
    <assistant>  <tool_call>{"name":"calc","arguments":{"expr":"423*456"}}</tool_call>
    <tool>       192888
    <assistant>  <tool_call>{"name":"calc","arguments":{"expr":"192888+789"}}</tool_call>
    <tool>       193677
    <assistant>  =193677

A one-step problem stops after the first result (``=192888``): two assistant turns, three for
a two-step one. The factors are drawn from 317..999 and the addend from 100..999, so every
product and every sum has 6 digits (317 * 317 = 100489, 999 * 999 + 999 = 999000): each kind
of conversation has one shape, and copying is a matter of fixed offsets, which a tiny model
learns in minutes.

Stage one (SFT, :func:`make_demos`) shows those conversations on a random 40% of the problems
and a bare answer from memory (``=193677``, one turn) on the rest, so the warmed-up model knows
the call format and how to copy a result but mostly answers from memory, and greedily almost
always does (its first token is ``=`` more often than ``<tool_call>``): its reward is near 0.
Stage two (GRPO, :func:`make_items`, :class:`CalculatorEvaluator`) must learn the rest: that
answers from memory are wrong, that the tool is worth calling every time and twice when the
problem has two operations, and to copy without slips.
"""

from __future__ import annotations

import random
import re
from collections.abc import Iterator
from typing import Any

from nexrl_async.core.records import DataItem, EvalResult, Trajectory

_EXPR = re.compile(r"(\d{1,6})([+*])(\d{1,6})")


def eval_expr(expr: str) -> int:
    """The value of ``a+b`` or ``a*b`` on non-negative integers of up to 6 digits."""
    match = _EXPR.fullmatch(expr.strip())
    if match is None:
        raise ValueError(f"expected a+b or a*b, got {expr!r}")
    a, op, b = int(match[1]), match[2], int(match[3])
    return a + b if op == "+" else a * b


async def calc(expr: str) -> str:
    """Evaluate ``a+b`` or ``a*b`` on non-negative integers of up to 6 digits (one operation)."""
    return str(eval_expr(expr))


def call_text(expr: str) -> str:
    """The assistant turn that calls the tool: compact Hermes JSON, as the model says it."""
    return f'<tool_call>{{"name":"calc","arguments":{{"expr":"{expr}"}}}}</tool_call>'


LOW, HIGH = 317, 999
"""Factor range: 317 * 317 = 100489 and 999 * 999 = 998001 both have 6 digits."""
ADD_LOW = 100
"""Addend range ``ADD_LOW..HIGH``: every ``a*b+c`` stays at 6 digits (at most 999000)."""


def problem(rng: random.Random, two_step_share: float = 0.5) -> tuple[str, list[str], str]:
    """A random problem: its text, the expressions of the calls that solve it, its value.

    ``a*b`` (one call) or, with probability ``two_step_share``, ``a*b+c`` (two calls: ``a*b``,
    then its result ``+c``).
    """
    a, b = rng.randint(LOW, HIGH), rng.randint(LOW, HIGH)
    if rng.random() >= two_step_share:
        return f"{a}*{b}", [f"{a}*{b}"], str(a * b)
    c = rng.randint(ADD_LOW, HIGH)
    return f"{a}*{b}+{c}", [f"{a}*{b}", f"{a * b}+{c}"], str(a * b + c)


def make_items(
    count: int = 4096, seed: int = 0, two_step_share: float = 0.5
) -> Iterator[dict[str, str]]:
    """RL items: ``prompt`` (the problem) and ``answer`` (its value)."""
    rng = random.Random(seed)
    for _ in range(count):
        text, _, value = problem(rng, two_step_share)
        yield {"prompt": text, "answer": value}


def make_demos(
    count: int = 4096, seed: int = 0, tool_share: float = 0.4, two_step_share: float = 0.5
) -> Iterator[dict[str, Any]]:
    """SFT demonstrations (``messages``): the tool conversation (one call per operation) on
    ``tool_share`` of the problems, a bare answer on the others."""
    rng = random.Random(seed)
    for _ in range(count):
        text, calls, value = problem(rng, two_step_share)
        messages: list[dict[str, str]] = [{"role": "user", "content": text}]
        if rng.random() < tool_share:
            for expr in calls:
                result = str(eval_expr(expr))
                messages += [
                    {"role": "assistant", "content": call_text(expr)},
                    {"role": "tool", "name": "calc", "content": result},
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
