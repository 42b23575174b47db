from __future__ import annotations

from collections.abc import Callable, Sequence

import pytest

from nexrl_async.core.records import (
    FailureReason,
    Group,
    Status,
    Trajectory,
    Turn,
    VersionSpan,
    VersionToken,
)

GroupFactory = Callable[..., Group]


def build_group(
    token: VersionToken,
    *,
    head: int | None = None,
    rewards: Sequence[float] = (0.0, 1.0),
    failed: bool = False,
    item_key: str | None = None,
) -> Group:
    """A finished group under ``token`` whose oldest token came from version ``head``."""
    head = token.version if head is None else head
    trajectories = []
    for i, reward in enumerate(rewards):
        turn = Turn(
            role="assistant",
            token_ids=[1, 2],
            loss_mask=[1, 1],
            versions=[
                VersionSpan(start=0, end=1, version=head + i % 2),
                VersionSpan(start=1, end=2, version=head),
            ],
        )
        bad = failed and i == 0
        trajectories.append(
            Trajectory(
                group_id=f"g{token.lease_id}",
                item_key=item_key or f"0:{token.lease_id}",
                sample_index=i,
                token=token,
                turns=[turn],
                reward=reward,
                status=Status.FAILED if bad else Status.OK,
                failure=FailureReason.TIMEOUT if bad else None,
            )
        )
    return Group(
        group_id=f"g{token.lease_id}",
        item_key=item_key or f"0:{token.lease_id}",
        token=token,
        trajectories=trajectories,
    )


@pytest.fixture(scope="session")
def make_group() -> GroupFactory:
    return build_group
