"""Part (2) of the train-step benchmark: how much of the token slots each layout leaves empty.

Over ``--padding-batches`` batches of ``--padding-rows`` rows, per token budget, for an RL length
mix (``--padding-*``: prompts of 32-256 tokens, log-normal responses) and for part (1)'s
long-tail mix: packed micro-batches (first-fit decreasing; ``max(budget, tokens)`` slots each,
as ``train/packing_plan.py`` counts: the budget a last, partly filled micro-batch leaves
unused), the least any packing can reach (``ceil(tokens / budget)`` micro-batches), padded
micro-batches (``rows · longest <= budget``), one batch padded to its longest row. Target:
packed <= 5 % on the RL mix at the trainer's default budget.
"""

from __future__ import annotations

import math
import random
import statistics
from collections.abc import Sequence
from typing import Any

from nexrl_async.train import packing_plan as plans
from train_step_baseline import response_length

PADDING_TARGET = 0.05


def row_lengths(rng: random.Random, mix: dict[str, Any], rows: int) -> list[int]:
    """Prompt (uniform) plus response (log-normal) tokens of ``rows`` rows of a length mix."""
    low, high = mix["prompt"]
    return [
        rng.randint(low, high) + response_length(rng, mix["median"], mix["sigma"], mix["max"])
        for _ in range(rows)
    ]


def packing_bound(lengths: Sequence[int], budget: int) -> float:
    """The least packed padding fraction any plan can reach: rows over the budget alone, the
    rest in ``ceil(tokens / budget)`` micro-batches (only the last one partly empty)."""
    rest = sum(n for n in lengths if n <= budget)
    slots = sum(n for n in lengths if n > budget) + math.ceil(rest / budget) * budget
    return 1.0 - sum(lengths) / slots


def padding_fractions(lengths: list[int], budget: int) -> dict[str, float]:
    packed = plans.plan_micro_batches(lengths, budget)
    padded = plans.plan_padded_micro_batches(lengths, budget)
    return {
        "packed": plans.padding_fraction(lengths, packed, packed=True, budget=budget),
        "packed_bound": packing_bound(lengths, budget),
        "padded": plans.padding_fraction(lengths, padded, packed=False),
        "pad_to_longest": plans.padding_fraction(
            lengths, [list(range(len(lengths)))], packed=False
        ),
    }


def _mean_max(runs: list[dict[str, float]]) -> dict[str, dict[str, float]]:
    return {k: {"mean": statistics.fmean(r[k] for r in runs), "max": max(r[k] for r in runs)}
            for k in runs[0]}  # fmt: skip


def measure_padding(args: Any) -> dict[str, Any]:
    """Padding fractions of the RL mix (``--padding-*``; the target) and of part (1)'s mix."""
    rl = {"prompt": [32, 256], "median": args.padding_median_len, "sigma": args.padding_sigma,
          "max": args.padding_max_len}  # fmt: skip
    short = {"prompt": [8, 32], "median": args.median_len, "sigma": args.sigma, "max": args.max_len}
    rng = random.Random(args.seed + 1)
    mixes: dict[str, Any] = {}
    for name, mix in (("rl", rl), ("step", short)):
        found: dict[int, list[dict[str, float]]] = {b: [] for b in args.budgets}
        for _ in range(args.padding_batches):
            lengths = row_lengths(rng, mix, args.padding_rows)
            for budget in args.budgets:
                found[budget].append(padding_fractions(lengths, budget))
        budgets = {str(b): _mean_max(runs) for b, runs in found.items()}
        mixes[name] = {"length_mix": mix, "budgets": budgets}
    at_default = mixes["rl"]["budgets"].get(str(args.default_budget), {})
    worst = at_default.get("packed", {}).get("max", math.nan)
    return {
        "rows": args.padding_rows, "batches": args.padding_batches, "mixes": mixes,
        "default_budget": args.default_budget, "packed_max_at_default": worst,
        "target": PADDING_TARGET, "passed": worst <= PADDING_TARGET,
    }  # fmt: skip
