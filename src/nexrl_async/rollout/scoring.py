"""Evaluator glue: call the user's scorer however it is written and vet what it returns.

An evaluator is anything with ``evaluate(item, trajectory)``, or a bare function of the same
two arguments. It returns an :class:`EvalResult`; a bare number (``bool``, ``int``, ``float``)
is accepted as the reward with no metrics.

Where it runs (one rule, declared by the evaluator):

- ``async def`` ones are awaited on the event loop;
- plain ones run in a worker thread (reward code is often CPU-bound: regexes, sympy, a
  sandbox), where a sample timeout abandons a stuck call;
- plain ones that declare ``inline = True`` (a class attribute, or an attribute of the
  function) run on the event loop. That saves the thread hop, about 110 µs of the loop's CPU
  and 260 µs of latency per sample on the 2-core CPU box, against 2 µs for the reverse-digits
  evaluator itself; but the loop, so every rollout, waits while it runs, and no timeout can
  stop it. Declare it only for scorers that take well under 100 µs and cannot hang (string
  comparisons, small arithmetic).

Failures: a reward or metric that is not a finite number raises :class:`SampleFailed`
(``invalid_reward``); what the evaluator raises passes through to the worker's fault boundary,
which counts it as ``evaluator_error``.
"""

from __future__ import annotations

import functools
import inspect
import math
from collections.abc import Awaitable, Callable
from numbers import Real
from typing import Any

import anyio.to_thread

from nexrl_async.core.errors import UserCodeError
from nexrl_async.core.records import DataItem, EvalResult, FailureReason, Trajectory
from nexrl_async.data import source_of
from nexrl_async.rollout.faults import SampleFailed

EvaluateFn = Callable[[DataItem, Trajectory], Awaitable[Any]]
"""An evaluator normalised to one awaitable call."""


def as_evaluate_fn(evaluator: Any) -> EvaluateFn:
    """``evaluator.evaluate`` (or ``evaluator`` itself when it is a function), as an async call.

    Raises :class:`UserCodeError` when there is nothing callable to use.
    """
    fn = getattr(evaluator, "evaluate", None)
    if fn is None and inspect.isroutine(evaluator):
        fn = evaluator
    if not callable(fn):
        raise UserCodeError(
            f"{evaluator!r} is not an evaluator: it needs a method evaluate(item, trajectory)"
        )
    if inspect.iscoroutinefunction(fn):
        return fn  # type: ignore[no-any-return]
    sync_fn: Callable[[DataItem, Trajectory], Any] = fn
    if getattr(evaluator, "inline", False) is True or getattr(fn, "inline", False) is True:
        return InlineEvaluate(sync_fn)

    async def in_thread(item: DataItem, trajectory: Trajectory) -> Any:
        # abandon_on_cancel: a sample timeout must not wait for a stuck scorer thread
        return await anyio.to_thread.run_sync(
            functools.partial(sync_fn, item, trajectory), abandon_on_cancel=True
        )

    return in_thread


class InlineEvaluate:
    """A sync evaluator declared ``inline = True``, called on the event loop: it never waits."""

    def __init__(self, fn: Callable[[DataItem, Trajectory], Any]) -> None:
        self._fn = fn

    async def __call__(self, item: DataItem, trajectory: Trajectory) -> Any:
        return self._fn(item, trajectory)


def evaluates_inline(evaluate: EvaluateFn) -> bool:
    """Whether ``evaluate`` (from :func:`as_evaluate_fn`) runs on the event loop, never waiting."""
    return isinstance(evaluate, InlineEvaluate)


class SourceEvaluators:
    """Scores each item with the evaluator of its data source, else the default one.

    The source is the ``<name>/`` prefix of the item's key (a mixture's sources, docs/data.md);
    each evaluator keeps its own placement (async, thread or inline) by :func:`as_evaluate_fn`.
    """

    def __init__(self, default: Any, by_source: dict[str, Any]) -> None:
        self._default = as_evaluate_fn(default)
        self._by_source = {name: as_evaluate_fn(ev) for name, ev in by_source.items()}

    async def evaluate(self, item: DataItem, trajectory: Trajectory) -> Any:
        name = source_of(item.key)
        evaluate = self._by_source.get(name, self._default) if name else self._default
        return await evaluate(item, trajectory)


async def score(evaluate: EvaluateFn, item: DataItem, trajectory: Trajectory) -> EvalResult:
    """Run the evaluator and vet its result (an invalid one raises :class:`SampleFailed`).

    What the evaluator raises passes through; the worker's fault boundary counts it as
    ``evaluator_error``.
    """
    return vet_result(await evaluate(item, trajectory))


def vet_result(result: Any) -> EvalResult:
    """``result`` as an :class:`EvalResult` with a finite float reward and float metrics."""
    if isinstance(result, Real) and not isinstance(result, EvalResult):
        result = EvalResult(reward=float(result))
    if not isinstance(result, EvalResult):
        raise SampleFailed(
            FailureReason.INVALID_REWARD,
            f"evaluate returned {type(result).__name__}, expected EvalResult or a number",
        )
    reward = _finite(result.reward, "reward")
    if not isinstance(result.metrics, dict):
        raise SampleFailed(FailureReason.INVALID_REWARD, "metrics must be a dict of floats")
    metrics = {str(k): _finite(v, f"metric {k!r}") for k, v in result.metrics.items()}
    return EvalResult(
        reward=reward, metrics=metrics, ground_truth=result.ground_truth, extra=result.extra
    )


def _finite(value: Any, what: str) -> float:
    if not isinstance(value, Real):
        raise SampleFailed(
            FailureReason.INVALID_REWARD, f"{what} is {type(value).__name__}, not a number"
        )
    number = float(value)
    if not math.isfinite(number):
        raise SampleFailed(FailureReason.INVALID_REWARD, f"{what} is {number}")
    return number
