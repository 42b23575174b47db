"""The staleness gate's checkpointed state: its counters and its msgpack-able snapshot."""

from __future__ import annotations

from typing import Literal

import msgspec

from nexrl_async.core.records import VersionToken

Mode = Literal["sync", "batch-async", "fully-async"]
OverdueAction = Literal["wait", "drop", "requeue"]


class GateCounters(msgspec.Struct, kw_only=True):
    """Cumulative lease counts (checkpointed)."""

    issued: int = 0
    """Leases ever issued (requeues not included)."""
    redeemed: int = 0
    """Leases whose group was trained."""
    released: int = 0
    """Leases given back: failed, filtered or abandoned groups."""
    dropped: int = 0
    """Leases given back because their group was overdue."""
    requeued: int = 0
    """Times an overdue lease was re-issued at a newer version."""
    refused: int = 0
    """``try_lease`` calls answered ``None``."""


class GateState(msgspec.Struct, kw_only=True):
    """What :meth:`~nexrl_async.pipeline.staleness.StalenessGate.state_dict` saves."""

    mode: Mode
    max_staleness: int | None
    batch_groups: int
    version: int
    next_lease_id: int
    outstanding: list[VersionToken]
    requeued: list[int]
    counters: GateCounters
