"""The seams between layers, as ``typing.Protocol`` s.

Implementations live in the layer that owns them (``data/``, ``rollout/``, ``obs/``); the engine
wires them together knowing only these shapes.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol, runtime_checkable

from nexrl_async.core.records import DataItem, EvalResult, Trajectory


@runtime_checkable
class DataSource(Protocol):
    """An endless-or-finite, resumable stream of :class:`DataItem` s."""

    def next_item(self) -> DataItem | None:
        """The next item, or ``None`` once every epoch is exhausted."""
        ...

    def replay(self, item: DataItem) -> None:
        """Hand ``item`` out again before new ones (its group failed or was dropped)."""
        ...

    def state_dict(self) -> dict[str, Any]:
        """A msgpack-able cursor; :meth:`load_state_dict` continues exactly from it."""
        ...

    def load_state_dict(self, state: Mapping[str, Any]) -> None: ...


@runtime_checkable
class Evaluator(Protocol):
    """Scores one finished sample. May be sync or async; sync ones run in a worker thread."""

    def evaluate(self, item: DataItem, trajectory: Trajectory) -> EvalResult: ...


@runtime_checkable
class MetricsSink(Protocol):
    """Receives one flat dict of float metrics per step (keys slash-namespaced)."""

    def log(self, step: int, metrics: Mapping[str, float]) -> None: ...

    def close(self) -> None: ...
