"""``[pool]`` and ``[staleness]``: the trajectory pool and version-token admission control."""

from __future__ import annotations

from typing import Literal

from msgspec import Struct

from nexrl_async.config.types import (
    GroupCount,
    GroupSize,
    NonNegInt,
    PosFloat,
    PosInt,
    Probability,
)

FailedSamples = Literal["drop_sample", "zero_reward", "drop_group"]


class PoolConfig(Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """The bounded trajectory pool between rollouts and the trainer (docs/architecture.md §2)."""

    batch_groups: GroupCount = 8
    """Groups per training step."""
    capacity_groups: GroupCount | None = None
    """Groups the pool holds before rollouts block; defaults to 2 × batch_groups."""
    filter_zero_variance: bool = False
    """Drop groups whose rewards are all equal (no learning signal), counted."""
    failed_samples: FailedSamples = "drop_sample"
    """What a FAILED sample does to its group. ``drop_sample``: the group trains without it
    while at least ``min_group_size`` samples remain. ``zero_reward``: a sample whose
    evaluator failed (``evaluator_error``, ``invalid_reward``: its episode is complete) trains
    with reward 0; other failed samples are dropped as under ``drop_sample``. ``drop_group``:
    the whole group is discarded and its item replayed. Below ``min_group_size`` every policy
    discards the group. Every failure is counted by reason (``rollout/failed/<reason>``)."""
    min_group_size: GroupSize = 2
    """Fewest samples a group with failed samples must keep to be trained (capped at the
    group's size); fewer left: the group fails as a whole and its item replays."""
    group_by: list[str] = []
    """Item fields whose values form the advantage groups: groups of one step whose items
    agree on all of them share one baseline (e.g. ``["task_id"]``; several fields nest like
    NexRL's key list). Empty: each item's samples are their own group."""


class StalenessConfig(Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Batch-async staleness control by version tokens (docs/architecture.md §3)."""

    mode: Literal["sync", "batch-async", "fully-async"] = "batch-async"
    """``sync`` is on-policy (k = 0); ``batch-async`` bounds staleness by ``max_staleness``."""
    max_staleness: NonNegInt | None = None
    """k: a group consumed by step s has head version ≥ s − k. Defaults to 0 in ``sync``
    (and must be 0 there), 1 in ``batch-async``; ignored in ``fully-async``."""
    max_inflight_groups: GroupCount | None = None
    """Cap on leased, unconsumed groups; defaults to (k + 1) × batch_groups."""
    on_overdue: Literal["wait", "drop", "requeue"] = "wait"
    """A straggler about to exceed k: the step waits, the group is dropped, or it resumes."""

    @property
    def k(self) -> int | None:
        """The effective staleness bound; ``None`` when unbounded (fully-async)."""
        if self.mode == "fully-async":
            return None
        if self.max_staleness is not None:
            return self.max_staleness
        return 0 if self.mode == "sync" else 1


class FaultsConfig(Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """When failing samples stop the run instead of quietly training on nothing.

    Over the last ``window_groups`` groups that finished (trained, filtered or failed): a
    WARNING with the failures counted by reason once the share of groups with a failed sample
    passes ``warn_failed_fraction``, and the run stops (exit 1, the top reasons in the message)
    once a full window's share of failed groups reaches ``stop_failed_fraction``. A group
    fails when ``pool.failed_samples`` discards it, or when fewer than ``pool.min_group_size``
    of its samples were really scored (the rest zeroed); a group trained without some failed
    samples counts for the warning only.
    """

    window_groups: PosInt = 64
    """Finished groups the failure share is measured over."""
    warn_failed_fraction: Probability = 0.25
    """Warn (once per crossing) when this share of the window had failed samples."""
    stop_failed_fraction: Probability = 0.95
    """Stop the run when this share of a full window failed (1.0: only when all did)."""
    stall_warn_s: PosFloat = 30.0
    """Warn when requests are pending and no sample has finished for this long."""
    stall_restart_s: PosFloat = 60.0
    """Then restart the launched servers holding requests; if no sample finishes for as long
    again (or the servers are attached), stop the run (exit 1). Raise it for generations that
    legitimately take longer than this with nothing else finishing."""
