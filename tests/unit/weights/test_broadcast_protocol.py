"""The broadcast wire protocol between the trainer's sender and the local server's receiver.

Both ends run in this process (two worker threads, gloo on loopback): ``train.broadcast``
(rank 0) against ``inference.local.update_group`` (rank 1), as the real HTTP path pairs them.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from functools import partial

import anyio
import anyio.to_thread
import pytest
import torch

from nexrl_async.core.errors import WeightSyncError
from nexrl_async.inference.local.update_group import (
    TensorSpec,
    UpdateGroup,
    UpdateGroups,
    parse_dtype,
)
from nexrl_async.weights.sender import Bucket, WeightSender, plan_buckets

pytestmark = pytest.mark.distributed


def _tensors() -> list[tuple[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(0)
    return [
        ("a.weight", torch.randn(3, 5, generator=gen)),
        ("b.bias", torch.randn(7, generator=gen).to(torch.bfloat16)),  # 14 bytes: misaligns
        ("c.weight", torch.randn(2, 3, generator=gen)),
        ("d.scalar", torch.tensor(1.5)),
    ]


def _specs(bucket: Bucket) -> list[TensorSpec]:
    return [
        TensorSpec(n, parse_dtype(d), tuple(s))
        for n, d, s in zip(bucket.names, bucket.dtypes, bucket.shapes, strict=True)
    ]


@pytest.fixture
async def pair() -> Iterator[tuple[WeightSender, UpdateGroup]]:
    """A connected sender (rank 0) and receiver group (rank 1), world size 2."""
    sender = WeightSender(
        master_address="127.0.0.1", master_port=0, world_size=2, group_name="g", timeout_s=5
    )
    groups = UpdateGroups(device=torch.device("cpu"), timeout_s=5)
    join = partial(
        groups.join,
        "g",
        master_address="127.0.0.1",
        master_port=sender.port,
        rank=1,
        world_size=2,
        backend="gloo",
    )
    out: dict[str, UpdateGroup] = {}

    async def joiner() -> None:
        out["group"] = await anyio.to_thread.run_sync(join)

    async with anyio.create_task_group() as tg:
        tg.start_soon(joiner)
        await anyio.to_thread.run_sync(sender.connect)
    yield sender, out["group"]
    out["group"].leave()
    sender.close()


@pytest.mark.parametrize("load_format", ["flattened_bucket", None])
async def test_round_trip_in_announced_order(
    pair: tuple[WeightSender, UpdateGroup], load_format: str | None
) -> None:
    sender, group = pair
    buckets = plan_buckets(_tensors(), bucket_mb=1)
    assert [b.dtypes[0] for b in buckets] == ["float32", "bfloat16", "float32"]
    received: list[tuple[str, torch.Tensor]] = []

    async def receive() -> None:
        for bucket in buckets:
            got = await anyio.to_thread.run_sync(
                partial(group.receive, _specs(bucket), load_format=load_format)
            )
            received.extend(got)

    async with anyio.create_task_group() as tg:
        tg.start_soon(receive)
        sent = await anyio.to_thread.run_sync(sender.send_buckets, buckets, load_format)
    expected = _tensors()
    assert sent == sum(t.numel() * t.element_size() for _, t in expected)
    assert [n for n, _ in received] == [n for n, _ in expected]
    for (_, got), (_, want) in zip(received, expected, strict=True):
        assert got.dtype == want.dtype
        assert torch.equal(got, want)


async def test_abort_releases_a_sender_nobody_receives_from(
    pair: tuple[WeightSender, UpdateGroup],
) -> None:
    sender, _ = pair
    start = time.monotonic()

    async def abort_soon() -> None:
        await anyio.sleep(0.2)
        sender.abort()

    async with anyio.create_task_group() as tg:
        tg.start_soon(abort_soon)
        with pytest.raises(WeightSyncError, match="aborted"):
            await anyio.to_thread.run_sync(partial(sender.send, _tensors(), bucket_mb=1))
    assert time.monotonic() - start < 2.0
    assert not sender.usable
    with pytest.raises(WeightSyncError, match="not usable"):
        sender.send(_tensors(), bucket_mb=1)


async def test_leaving_stops_a_pending_receive(pair: tuple[WeightSender, UpdateGroup]) -> None:
    _, group = pair
    specs = _specs(plan_buckets(_tensors(), bucket_mb=1)[0])
    start = time.monotonic()

    async def leave_soon() -> None:
        await anyio.sleep(0.2)
        group.leave()

    async with anyio.create_task_group() as tg:
        tg.start_soon(leave_soon)
        with pytest.raises(WeightSyncError, match="destroyed"):
            await anyio.to_thread.run_sync(partial(group.receive, specs, load_format=None))
    assert time.monotonic() - start < 2.0


def test_plan_buckets_respects_size_dtype_and_order() -> None:
    big = torch.zeros(2**18)  # 1 MiB of float32
    named = [
        ("x", torch.zeros(2**17)),  # 0.5 MiB
        ("y", torch.zeros(2**17)),  # fills the first bucket
        ("z", big),  # too big to share: a bucket of its own
        ("h", torch.zeros(4, dtype=torch.float16)),  # dtype change: new bucket
        ("w", torch.zeros(4)),
    ]
    buckets = plan_buckets(named, bucket_mb=1)
    assert [b.names for b in buckets] == [["x", "y"], ["z"], ["h"], ["w"]]
    assert buckets[0].nbytes == 2**20
    assert buckets[2].dtypes == ["float16"]
    assert buckets[1].shapes == [[2**18]]


def test_sender_rejects_a_group_without_servers() -> None:
    with pytest.raises(WeightSyncError, match="at least one server"):
        WeightSender(master_address="127.0.0.1", master_port=0, world_size=1)


def test_join_validates_rank_and_backend() -> None:
    groups = UpdateGroups(device=torch.device("cpu"), timeout_s=1)
    with pytest.raises(WeightSyncError, match="rank_offset 0"):
        groups.join(
            "g", master_address="127.0.0.1", master_port=1, rank=0, world_size=2, backend="gloo"
        )
    with pytest.raises(WeightSyncError, match="backend"):
        groups.join(
            "g", master_address="127.0.0.1", master_port=1, rank=1, world_size=2, backend="mpi"
        )
    with pytest.raises(ValueError, match="unsupported dtype"):
        parse_dtype("complex32")
    assert parse_dtype("torch.bfloat16") is torch.bfloat16


def test_destroying_a_join_under_way_frees_the_name() -> None:
    """A rendezvous cannot be interrupted: destroy disowns it, a new join may start at once."""
    groups = UpdateGroups(device=torch.device("cpu"), timeout_s=1)
    stale = groups.reserve("g")
    with pytest.raises(WeightSyncError, match="already exists"):
        groups.reserve("g")
    groups.leave("g")  # the trainer gave up on that group
    fresh = groups.reserve("g")
    assert groups.register("g", stale, None) is False  # the old join ends: ignored
    assert groups.register("g", fresh, None) is True
    with pytest.raises(WeightSyncError, match="does not exist"):
        groups.leave("g")
