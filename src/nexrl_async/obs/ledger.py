"""The RunLedger: every step of a trajectory's life as a typed event in ``events.jsonl``.

One JSON object per line, tagged by its ``event`` field (docs/architecture.md §2 point 6)::

    {"event":"admitted","lease_id":3,"version":1,"item_key":"0:17","group_id":"g3","time":...}

Events are frozen msgspec Structs in one tagged union, :data:`Event`. Each carries ``time``
(``time.time()`` when it was built). Tests and benchmarks read the ledger back with
:func:`read_events` and assert on it.

Tags: run_started, run_resumed, admitted, turn_generated, scored, pooled, trained, dropped,
failed, published, validated, checkpointed, run_finished.

Floats that may be non-finite (a reward the evaluator got wrong, a validation metric) are typed
``float | None``: JSON has no NaN, so they are written and read back as ``null``/``None``.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import Annotated, TypeAlias

import msgspec
from loguru import logger
from msgspec import Meta, Struct, field

from nexrl_async.core.errors import DataError
from nexrl_async.core.records import FailureReason, Status
from nexrl_async.obs.jsonlines import JsonlWriter, iter_lines

NonNegInt = Annotated[int, Meta(ge=0)]


class _Event(Struct, frozen=True, kw_only=True, tag_field="event", forbid_unknown_fields=True):
    """Common base: the tag field ``event`` and the wall-clock ``time``."""

    time: float = field(default_factory=time.time)
    """``time.time()`` when the event was built."""


class RunStarted(_Event, frozen=True, tag="run_started"):
    """A run began (fresh, or resumed from a checkpoint folder)."""

    config_hash: str
    """Hash of the resolved config (the same recipe gives the same hash)."""
    resumed_from: str | None = None
    """Checkpoint path this run resumes from, if any."""


class RunResumed(_Event, frozen=True, tag="run_resumed"):
    """State was restored from a checkpoint; training continues at ``step``."""

    step: NonNegInt
    path: str


class Admitted(_Event, frozen=True, tag="admitted"):
    """The gate issued a lease and an item was taken for a group."""

    lease_id: NonNegInt
    version: NonNegInt
    """Policy version when the lease was issued."""
    item_key: str
    group_id: str


class TurnGenerated(_Event, frozen=True, tag="turn_generated"):
    """One assistant turn of one sample came back from a server."""

    group_id: str
    sample_index: NonNegInt
    turn: NonNegInt
    n_tokens: NonNegInt
    weight_version: NonNegInt
    """Weight version the server reported for this turn (oldest one if it changed mid-turn)."""
    server: str


class Scored(_Event, frozen=True, tag="scored"):
    """One sample was scored (or failed)."""

    group_id: str
    sample_index: NonNegInt
    reward: float | None
    """``None`` when the value was not finite."""
    status: Status
    failure: FailureReason | None = None


class Pooled(_Event, frozen=True, tag="pooled", omit_defaults=True):
    """A finished group entered the trajectory pool (without the failed samples it dropped;
    fields at their defaults are not written)."""

    group_id: str
    head_version: NonNegInt
    samples: NonNegInt | None = None
    """Samples kept (``None`` in logs written before partial groups)."""
    dropped: list[FailureReason] = []
    """Reasons of the failed samples dropped from the group, one per sample."""
    zeroed: list[FailureReason] = []
    """Reasons of the failed samples kept with reward 0, one per sample."""


class Trained(_Event, frozen=True, tag="trained"):
    """Step ``step`` consumed these groups (lists are parallel) and produced ``policy_version``."""

    step: NonNegInt
    group_ids: list[str]
    item_keys: list[str]
    head_versions: list[NonNegInt]
    staleness: list[int]
    """Per group, ``step - head_version``."""
    policy_version: NonNegInt


class Dropped(_Event, frozen=True, tag="dropped"):
    """A group was discarded (e.g. overdue under ``on_overdue = "drop"``); its item replays."""

    group_id: str
    item_key: str
    reason: str


class Failed(_Event, frozen=True, tag="failed"):
    """A group failed as a whole; its item replays. ``reasons`` lists its samples' reasons."""

    group_id: str
    item_key: str
    reasons: list[FailureReason]


class Published(_Event, frozen=True, tag="published"):
    """Every server loaded weight ``version``."""

    version: NonNegInt
    transport: str
    bytes: NonNegInt
    transfer_s: float
    pause_s: float
    servers: list[str]


class Validated(_Event, frozen=True, tag="validated"):
    """Validation ran before step ``step``; ``metrics`` as logged (``None`` where non-finite)."""

    step: NonNegInt
    metrics: dict[str, float | None]


class Checkpointed(_Event, frozen=True, tag="checkpointed"):
    """A checkpoint of the state after ``step`` steps was written to ``path``."""

    step: NonNegInt
    path: str


class RunFinished(_Event, frozen=True, tag="run_finished"):
    """The run ended (``reason``: completed, max_wall_s, data_exhausted, error, ...)."""

    reason: str
    step: NonNegInt


Event: TypeAlias = (
    RunStarted
    | RunResumed
    | Admitted
    | TurnGenerated
    | Scored
    | Pooled
    | Trained
    | Dropped
    | Failed
    | Published
    | Validated
    | Checkpointed
    | RunFinished
)
"""Any ledger event (tagged by ``event``)."""

_DECODER: msgspec.json.Decoder[Event] = msgspec.json.Decoder(Event)


LAZY_EVENTS = (Admitted, TurnGenerated, Scored, Pooled)
"""Events emitted per sample or group, written without a flush of their own."""


class RunLedger:
    """Appends events to ``path`` (``events.jsonl``), one line each; never truncates.

    :meth:`emit` may be called from the event-loop thread and from worker threads: the write is
    one locked append. It costs one msgspec encode and one small write, so it is fine on the loop.
    The per-sample events (:data:`LAZY_EVENTS`: several a sample, the bulk of the file) are
    written lazily (see :mod:`~nexrl_async.obs.jsonlines`); every other event flushes at once,
    carrying the lazy lines before it, so the file's order is the emission order and a step's
    events are on disk when its ``trained`` event is.
    """

    def __init__(self, path: Path) -> None:
        self._writer = JsonlWriter(path)
        self._listeners: list[Callable[[Event], None]] = []

    def subscribe(self, listener: Callable[[Event], None]) -> None:
        """Call ``listener(event)`` after each event is written, in the emitting thread; it must
        be quick and must not raise (the Python API's callbacks catch their own errors)."""
        self._listeners.append(listener)

    @property
    def path(self) -> Path:
        return self._writer.path

    def emit(self, event: Event) -> None:
        """Append ``event``. After :meth:`close` the event is dropped with one warning."""
        self._writer.write_line(msgspec.json.encode(event), lazy=isinstance(event, LAZY_EVENTS))
        for listener in self._listeners:
            listener(event)

    def close(self) -> None:
        self._writer.close()

    def __enter__(self) -> RunLedger:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def read_events(path: Path) -> list[Event]:
    """Every event in ``path``, in order.

    Torn lines (not JSON; left by a killed writer) are skipped with a warning. A JSON line that
    is not a known event raises :class:`DataError` naming the line.
    """
    events: list[Event] = []
    for number, line in iter_lines(path):
        try:
            events.append(_DECODER.decode(line))
        except msgspec.ValidationError as err:
            raise DataError(f"{path}:{number}: not a ledger event: {err}") from err
        except msgspec.DecodeError:
            logger.warning("{}:{}: torn line skipped", path, number)
    return events
