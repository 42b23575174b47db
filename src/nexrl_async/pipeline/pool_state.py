"""The trajectory pool's checkpointed state: its counters and its contents."""

from __future__ import annotations

import msgspec

from nexrl_async.core.records import Group


class PoolCounters(msgspec.Struct, kw_only=True):
    """Cumulative group counts (checkpointed)."""

    pooled: int = 0
    handed_out: int = 0
    dropped_overdue: int = 0
    requeued: int = 0
    filtered_zero_variance: int = 0
    failed_groups: int = 0
    waits: int = 0
    """Steps that had to wait for stragglers."""
    over_capacity: int = 0
    """Groups admitted to a full pool because the next step waits for them."""
    partial_groups: int = 0
    """Groups kept with failed samples dropped or zeroed."""
    dropped_samples: int = 0
    """Failed samples dropped from kept groups."""
    zeroed_samples: int = 0
    """Failed samples kept with reward 0."""

    def metrics(self) -> dict[str, float]:
        """The cumulative ``pool/*`` counters."""
        return {
            "pool/dropped_overdue": float(self.dropped_overdue),
            "pool/requeued": float(self.requeued),
            "pool/filtered_zero_variance": float(self.filtered_zero_variance),
            "pool/failed_groups": float(self.failed_groups),
            "pool/partial_groups": float(self.partial_groups),
            "pool/dropped_samples": float(self.dropped_samples),
            "pool/zeroed_samples": float(self.zeroed_samples),
            "pool/waits": float(self.waits),
            "pool/over_capacity": float(self.over_capacity),
        }


class PoolState(msgspec.Struct, kw_only=True):
    """What ``TrajectoryPool.state_dict`` saves."""

    groups: list[Group]
    counters: PoolCounters
    waited_step: int | None
