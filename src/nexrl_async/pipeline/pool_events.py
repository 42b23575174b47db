"""What the trajectory pool reports: one event per outcome, msgspec-encodable with a ``kind`` tag.

Each event says whether the group's item should be handed out again (``replay``); the engine
follows that flag (``engine.flow``).
"""

from __future__ import annotations

from typing import ClassVar, Literal

import msgspec

from nexrl_async.core.records import TrainBatch, VersionToken


class _Event(msgspec.Struct, frozen=True, kw_only=True, tag_field="kind"):
    replay: ClassVar[bool] = False
    """Whether the engine should hand the group's item out again."""


class GroupPooled(_Event, frozen=True, kw_only=True, tag="pooled"):
    """A group is kept, waiting for a step (with fewer samples if some failed)."""

    group_id: str
    item_key: str
    token: VersionToken
    head_version: int
    pool_size: int
    samples: int = 0
    """Samples kept (failed ones dropped, zeroed ones counted)."""
    dropped: list[str] = []
    """Failure reasons of the samples dropped from the group, one per sample."""
    zeroed: list[str] = []
    """Failure reasons of the samples kept with reward 0 (``zero_reward``), one per sample."""
    degraded: bool = False
    """Fewer than ``min_group_size`` samples were scored without failure (the rest zeroed):
    the group trains, but counts as failed for the failure breaker."""


class GroupFailed(_Event, frozen=True, kw_only=True, tag="failed"):
    """A group whose failed samples fail it as a whole (``pool.failed_samples``): not
    trained, lease released."""

    replay: ClassVar[bool] = True
    group_id: str
    item_key: str
    token: VersionToken
    reasons: list[str]


class GroupFiltered(_Event, frozen=True, kw_only=True, tag="filtered"):
    """All rewards equal (no learning signal): not trained, lease released."""

    group_id: str
    item_key: str
    token: VersionToken
    reward: float


class GroupDropped(_Event, frozen=True, kw_only=True, tag="dropped"):
    """Overdue at ``step``: not trained, lease released."""

    replay: ClassVar[bool] = True
    group_id: str
    item_key: str
    token: VersionToken
    head_version: int
    step: int


class GroupRequeued(_Event, frozen=True, kw_only=True, tag="requeued"):
    """Overdue at ``step``: re-leased at a newer version and kept (its head version stays)."""

    group_id: str
    item_key: str
    old_token: VersionToken
    token: VersionToken
    head_version: int
    step: int


class LeaseOverdue(_Event, frozen=True, kw_only=True, tag="lease_overdue"):
    """A lease still in flight can no longer be trained by ``step`` under its current token."""

    token: VersionToken
    step: int
    action: Literal["drop", "requeue"]


class StepWaiting(_Event, frozen=True, kw_only=True, tag="step_waiting"):
    """Step ``step`` waits for these in-flight leases (reported once per step)."""

    step: int
    waiting_for: list[VersionToken]


PoolEvent = (
    GroupPooled
    | GroupFailed
    | GroupFiltered
    | GroupDropped
    | GroupRequeued
    | LeaseOverdue
    | StepWaiting
)
"""Every outcome the pool reports; ``msgspec`` encodes it with a ``kind`` tag."""


class Handout(msgspec.Struct, frozen=True, kw_only=True):
    """What ``TrajectoryPool.take_batch`` returns."""

    batch: TrainBatch | None
    """The step's batch, or ``None`` while not ready."""
    events: list[PoolEvent] = []
    """Outcomes to log (drops and requeues it caused, a first wait)."""
    waiting_for: list[VersionToken] = []
    """In-flight leases the step waits for (``wait`` only)."""
