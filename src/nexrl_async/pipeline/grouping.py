"""Grouping keys (``pool.group_by``): which groups of a step share one advantage baseline.

A rollout group holds the samples of one item under one lease, and the lease is the unit of
the staleness contract (a step consumes exactly ``B`` of them). ``group_by`` names item fields
(NexRL's key list: ``["task_id"]``, or several for a nested key such as
``["user_id", "session_id"]``); groups whose items agree on every one of them get the same
:attr:`~nexrl_async.core.records.Group.baseline_key`, and the trainer computes the group
advantage (``algorithms/advantages.py``) over all samples of a step that share a key.

So that such groups are trained together, the pool picks a step's groups with
:func:`cluster_by_key`: still earliest deadline first (the staleness contract needs it), but
among groups with the same deadline (the same lease version), whole key groups go together,
the ones that already have a member in the step first, then oldest first. A key group that
straddles two steps, or whose other groups are still in flight, gets one baseline per step:
the pool never delays a step to complete a key group.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Mapping, Sequence
from typing import Any, TypeVar

import msgspec

T = TypeVar("T")

_ENCODER = msgspec.json.Encoder(order="sorted")


def baseline_key(fields: Mapping[str, Any], names: Sequence[str]) -> str | None:
    """The key of an item with ``fields``: its values of ``names`` as canonical JSON (object
    keys sorted), or ``None`` when a field is missing or not JSON-encodable."""
    try:
        values = [fields[name] for name in names]
        return _ENCODER.encode(values).decode()
    except (KeyError, TypeError, msgspec.EncodeError):
        return None


def cluster_by_key(
    ordered: Sequence[T],
    count: int,
    *,
    tier: Callable[[T], Hashable],
    key: Callable[[T], Hashable],
) -> list[T]:
    """The first ``count`` of ``ordered`` (sorted by deadline), with the last deadline tier
    taken by whole key groups.

    Every entry of a tier strictly before the last one taken is in the result, as in
    ``ordered[:count]``; the remaining room is filled from the last tier, key group by key
    group: keys already among the earlier tiers' picks first, then by their first position in
    ``ordered``. At most one key group is split.
    """
    chosen = list(ordered[:count])
    if len(chosen) < count:
        return chosen
    last = tier(chosen[-1])
    fixed = [entry for entry in chosen if tier(entry) != last]
    present = {key(entry) for entry in fixed}
    clusters: dict[Hashable, list[T]] = {}
    for entry in ordered:
        if tier(entry) == last:
            clusters.setdefault(key(entry), []).append(entry)
    firsts = {k: i for i, k in enumerate(clusters)}
    order = sorted(clusters, key=lambda k: (k not in present, firsts[k]))
    rest = [entry for k in order for entry in clusters[k]]
    return fixed + rest[: count - len(fixed)]
