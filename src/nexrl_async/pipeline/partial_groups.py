"""Partial groups: what the FAILED samples of a finished group do to it (``pool.failed_samples``).

A group arrives with all its samples, some of which may have failed. :func:`settle_failures`
decides, before anything else looks at the group:

* ``drop_sample`` (default): the failed samples leave the group; the rest train together (the
  advantage baseline is over what remains, ``algorithms/advantages.py`` handles groups of any
  size).
* ``zero_reward``: a sample that failed in scoring (``evaluator_error``, ``invalid_reward``)
  has a complete episode whose masks the worker already checked; it stays with reward 0 (status
  OK, its ``failure_detail`` says why). Other failed samples (no complete episode to train
  on) leave the group as under ``drop_sample``.
* ``drop_group``: any failed sample fails the whole group.

A group keeps training while at least ``min(min_group_size, its size)`` samples remain;
otherwise it fails as a whole (lease released, item replayed), as does every group under
``drop_group`` with a failure. A group without failures is never touched.
"""

from __future__ import annotations

import msgspec

from nexrl_async.config.pipeline import FailedSamples
from nexrl_async.core.records import FailureReason, Group, Status, Trajectory

ZEROABLE: frozenset[FailureReason] = frozenset(
    {FailureReason.EVALUATOR_ERROR, FailureReason.INVALID_REWARD}
)
"""Failures that leave a complete, trainable episode (only its score is missing)."""


class Settled(msgspec.Struct, frozen=True, kw_only=True):
    """What :func:`settle_failures` decided for one group."""

    group: Group | None
    """The group to go on with (failed samples removed or zeroed); ``None``: it failed."""
    dropped: list[FailureReason] = []
    """Reasons of the failed samples removed from a kept group, one per sample."""
    zeroed: list[FailureReason] = []
    """Reasons of the failed samples kept with reward 0, one per sample."""
    scored: int = 0
    """Samples scored without failure."""


def settle_failures(group: Group, policy: FailedSamples, min_group_size: int) -> Settled:
    """Apply ``policy`` to ``group``'s failed samples; see the module docstring."""
    scored = sum(t.ok for t in group.trajectories)
    if scored == len(group.trajectories):
        return Settled(group=group, scored=scored)
    if policy == "drop_group":
        return Settled(group=None, scored=scored)
    kept: list[Trajectory] = []
    dropped: list[FailureReason] = []
    zeroed: list[FailureReason] = []
    for traj in group.trajectories:
        if traj.ok:
            kept.append(traj)
        elif traj.failure is None:  # unreachable: a FAILED trajectory has a reason
            raise ValueError(f"{traj.group_id}/{traj.sample_index} is FAILED without a reason")
        elif policy == "zero_reward" and traj.failure in ZEROABLE:
            kept.append(_zeroed(traj))
            zeroed.append(traj.failure)
        else:
            dropped.append(traj.failure)
    if len(kept) < min(min_group_size, len(group.trajectories)) or not kept:
        return Settled(group=None, scored=scored)
    partial = msgspec.structs.replace(group, trajectories=kept)
    return Settled(group=partial, dropped=dropped, zeroed=zeroed, scored=scored)


def _zeroed(traj: Trajectory) -> Trajectory:
    """``traj`` (FAILED in scoring) as an OK sample with reward 0."""
    detail = f"zero_reward after {traj.failure}: {traj.failure_detail}"
    return msgspec.structs.replace(
        traj, status=Status.OK, failure=None, reward=0.0, failure_detail=detail
    )
