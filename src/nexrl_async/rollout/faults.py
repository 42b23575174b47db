"""The per-sample fault boundary's vocabulary: which exception means which failure reason.

Failed samples are data, not exceptions (docs/style.md): the worker catches whatever one sample's
agent loop or evaluator raised, maps it to a :class:`FailureReason` with :func:`classify`, and
returns a FAILED trajectory. Cancellation is never caught.

Precedence: a :class:`SampleFailed` carries its own reason. A ``DataError`` while reading the
item or formatting the query is ``bad_item``. Otherwise the stage decides: anything raised while
formatting the query or rendering is ``format_error``; while scoring, ``evaluator_error``; while
running tools (outside a tool's own call, which becomes a tool message), ``tool_error``. While
generating or in other hooks the type decides:

=========================================  ====================
raised                                     reason
=========================================  ====================
``RequestRejected`` (HTTP 4xx)             ``prompt_rejected``
``EngineUnavailable``                      ``engine_unavailable``
``GenerationError`` / other inference      ``generation_error``
anything else                              ``internal``
=========================================  ====================

``invalid_reward`` is raised as :class:`SampleFailed` by the result check; ``timeout`` is
decided by the worker's deadline, not here.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Literal, Protocol, TypeVar

import anyio
from loguru import logger

from nexrl_async.core.errors import (
    DataError,
    EngineUnavailable,
    InferenceError,
    RequestRejected,
    RolloutError,
)
from nexrl_async.core.records import FailureReason


class SampleFailed(RolloutError):
    """Fail the current sample with ``reason``; custom workers may raise it from any hook."""

    def __init__(self, reason: FailureReason, detail: str) -> None:
        self.reason = reason
        self.detail = detail
        super().__init__(f"{reason.value}: {detail}")


Stage = Literal["item", "format", "render", "generate", "tools", "hooks", "evaluate"]
"""Where in a sample's life an exception was raised."""

_STAGE_REASONS: dict[str, FailureReason] = {
    "format": FailureReason.FORMAT_ERROR,
    "render": FailureReason.FORMAT_ERROR,
    "tools": FailureReason.TOOL_ERROR,
    "evaluate": FailureReason.EVALUATOR_ERROR,
}


def classify(err: Exception, stage: Stage) -> tuple[FailureReason, str]:
    """The failure reason and a one-line detail for an exception caught at the boundary."""
    if isinstance(err, SampleFailed):
        return err.reason, err.detail
    detail = f"{stage}: {type(err).__name__}: {err}"
    if isinstance(err, DataError) and stage in ("item", "format"):
        return FailureReason.BAD_ITEM, detail
    if stage in _STAGE_REASONS:
        return _STAGE_REASONS[stage], detail
    if isinstance(err, RequestRejected):
        return FailureReason.PROMPT_REJECTED, detail
    if isinstance(err, EngineUnavailable):
        return FailureReason.ENGINE_UNAVAILABLE, detail
    if isinstance(err, InferenceError):
        return FailureReason.GENERATION_ERROR, detail
    return FailureReason.INTERNAL, detail


T = TypeVar("T")


class Failable(Protocol):
    """A sample as the fault boundary sees it (the worker's ``Episode``)."""

    stage: Stage
    failure: tuple[FailureReason, str] | None

    @property
    def sticky_key(self) -> str: ...


async def guarded(
    episodes: Sequence[Failable], fn: Callable[..., Awaitable[T]], *args: Any
) -> T | None:
    """``await fn(*args)``: the per-sample fault boundary. What it raises (but cancellation)
    marks every one of ``episodes`` FAILED (``ep.failure``, by :func:`classify`); then ``None``."""
    try:
        return await fn(*args)
    except anyio.get_cancelled_exc_class():
        raise
    except Exception as err:  # noqa: BLE001 - the per-sample fault boundary
        failure = classify(err, episodes[0].stage)
        if failure[0] is FailureReason.INTERNAL:
            logger.opt(exception=err).warning("sample {} failed", episodes[0].sticky_key)
    for ep in episodes:
        ep.failure = failure
    return None
