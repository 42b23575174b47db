"""Build the worker a recipe's ``[rollout]`` section asks for, loading its user code.

References are ``file.py:Name`` (relative to ``base_dir``, the recipe's folder) or
``package.module:Name``:

- ``rollout.evaluator``: a class (instantiated with no arguments), an instance with
  ``evaluate(item, trajectory)``, or a plain function ``evaluate(item, trajectory)``.
- ``rollout.worker``: a class built with :class:`RolloutWorker` 's constructor keywords;
  normally a subclass overriding hooks, but any class with the same constructor and a
  ``run_group`` coroutine method is accepted.
- ``rollout.tools``: functions (``async def`` preferred); see ``tools.py``.
- ``data.sources.<i>.evaluator`` (``source_evaluators``): a mixture source's own evaluator,
  loaded like ``rollout.evaluator``; its items are scored by it (``scoring.SourceEvaluators``).

Every problem raises :class:`UserCodeError` naming the reference, before the run starts.
"""

from __future__ import annotations

import inspect
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from nexrl_async.config.rollout import RolloutConfig
from nexrl_async.core.errors import UserCodeError
from nexrl_async.core.usercode import load_object
from nexrl_async.rollout.events import RolloutEvents
from nexrl_async.rollout.generation import TurnGenerator
from nexrl_async.rollout.rendering import Tokenizer
from nexrl_async.rollout.sandbox import configure_tool
from nexrl_async.rollout.scoring import SourceEvaluators, as_evaluate_fn
from nexrl_async.rollout.tools import Tool
from nexrl_async.rollout.worker import RolloutWorker


def load_worker(
    cfg: RolloutConfig,
    *,
    tokenizer: Tokenizer,
    generator: TurnGenerator,
    base_dir: Path,
    required: Sequence[str] = (),
    events: RolloutEvents | None = None,
    context_length: int | None = None,
    source_evaluators: Mapping[str, str] | None = None,
) -> RolloutWorker:
    """The worker for ``cfg`` with its evaluator and tools loaded from user code
    (``source_evaluators``: ``{data source name: evaluator ref}`` overriding it per source)."""
    evaluator = load_evaluator(cfg.evaluator, base_dir)
    if source_evaluators:
        by_source = {n: load_evaluator(ref, base_dir) for n, ref in source_evaluators.items()}
        evaluator = SourceEvaluators(evaluator, by_source)
    configure_tool(cfg)
    tools = load_tools(cfg.tools, base_dir)
    cls = load_worker_class(cfg.worker, base_dir)
    try:
        return cls(
            cfg,
            tokenizer=tokenizer,
            generator=generator,
            evaluator=evaluator,
            tools=tools,
            required=required,
            events=events,
            context_length=context_length,
        )
    except UserCodeError:
        raise
    except Exception as err:
        raise UserCodeError(
            f"{cfg.worker or 'RolloutWorker'!r}: building the worker raised "
            f"{type(err).__name__}: {err}"
        ) from err


def load_worker_class(ref: str | None, base_dir: Path) -> type[RolloutWorker]:
    """``RolloutWorker`` when ``ref`` is ``None``, else the class ``ref`` names."""
    if ref is None:
        return RolloutWorker
    obj = load_object(ref, base_dir)
    if not inspect.isclass(obj):
        raise UserCodeError(f"{ref!r} must name a class, got {type(obj).__name__}")
    if not issubclass(obj, RolloutWorker) and not inspect.iscoroutinefunction(
        getattr(obj, "run_group", None)
    ):
        raise UserCodeError(
            f"{ref!r} must subclass nexrl_async.rollout.RolloutWorker "
            "or define 'async def run_group(item, token, *, group_id)'"
        )
    return typing.cast("type[RolloutWorker]", obj)  # duck-typed workers are accepted too


def load_evaluator(ref: str, base_dir: Path) -> Any:
    """The evaluator ``ref`` names: classes are instantiated with no arguments."""
    obj = load_object(ref, base_dir)
    if inspect.isclass(obj):
        try:
            obj = obj()
        except Exception as err:
            raise UserCodeError(
                f"{ref!r}: {obj.__name__}() raised {type(err).__name__}: {err}"
            ) from err
    try:
        as_evaluate_fn(obj)
    except UserCodeError as err:
        raise UserCodeError(f"{ref!r}: {err}") from None
    return obj


def load_tools(refs: Sequence[str], base_dir: Path) -> list[Tool]:
    """One :class:`Tool` per reference, names unique."""
    tools: list[Tool] = []
    for ref in refs:
        fn = load_object(ref, base_dir)
        if not callable(fn):
            raise UserCodeError(f"{ref!r} is not callable")
        try:
            tools.append(Tool(fn))
        except UserCodeError as err:
            raise UserCodeError(f"{ref!r}: {err}") from None
    names = [tool.name for tool in tools]
    if len(set(names)) != len(names):
        raise UserCodeError(f"rollout.tools: two tools share a name: {names}")
    return tools
