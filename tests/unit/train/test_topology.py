"""Topology from torchrun's environment, world-size-1 process groups, and the rank row split."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from hypothesis import given
from hypothesis import strategies as st

from nexrl_async.core.errors import ConfigError
from nexrl_async.core.records import Group, TrainBatch, Trajectory, Turn, VersionToken
from nexrl_async.train.ranks.topology import (
    Topology,
    destroy,
    init_process_groups,
    split_for_ranks,
    split_rows,
    training_device,
)

TORCHRUN_ENV = {
    "RANK": "3",
    "WORLD_SIZE": "4",
    "LOCAL_RANK": "1",
    "LOCAL_WORLD_SIZE": "2",
    "MASTER_ADDR": "10.0.0.7",
    "MASTER_PORT": "29500",
}


def test_a_plain_process_is_world_size_one() -> None:
    topology = Topology.from_env({})
    assert topology == Topology()
    assert not topology.distributed
    assert topology.is_main


def test_torchrun_variables_are_read() -> None:
    topology = Topology.from_env(TORCHRUN_ENV)
    assert topology == Topology(
        rank=3,
        world_size=4,
        local_rank=1,
        local_world_size=2,
        master_addr="10.0.0.7",
        master_port=29500,
    )
    assert topology.distributed
    assert not topology.is_main


def test_world_size_one_under_torchrun_needs_no_group() -> None:
    topology = Topology.from_env({"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0"})
    assert not topology.distributed


@pytest.mark.parametrize(
    ("env", "fragment"),
    [
        ({"WORLD_SIZE": "2"}, "RANK is not set"),
        ({"WORLD_SIZE": "2", "RANK": "2"}, "rank 2 is not in a world of size 2"),
        ({"WORLD_SIZE": "two", "RANK": "0"}, "WORLD_SIZE='two'"),
        ({"WORLD_SIZE": "2", "RANK": "1", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "1"}, "local"),
        ({"WORLD_SIZE": "0"}, "world of size 0"),
    ],
)
def test_bad_environments_are_config_errors(env: dict[str, str], fragment: str) -> None:
    with pytest.raises(ConfigError, match=fragment):
        Topology.from_env(env)


def test_world_size_one_groups_are_empty() -> None:
    groups = init_process_groups(Topology(), device="cpu", timeout_s=1.0)
    assert groups.device == torch.device("cpu")
    assert (groups.control, groups.command, groups.mesh) == (None, None, None)
    assert not dist.is_initialized()
    destroy(groups)  # a no-op


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_cuda_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="CUDA"):
        training_device(Topology(), "cuda")


def test_rows_are_dealt_longest_first_to_the_lightest_rank() -> None:
    # 9 -> r0, 7 -> r1, 5 -> r1 (7 < 9), 3 -> r0 (12 > 9), 1 -> r0 (12 == 12: lower rank)
    assert split_rows([5, 9, 1, 7, 3], 2) == [[1, 2, 4], [0, 3]]


def test_fewer_rows_than_ranks_leave_ranks_empty() -> None:
    assert split_rows([4, 2], 3) == [[0], [1], []]
    assert split_rows([], 2) == [[], []]
    with pytest.raises(ValueError, match="world_size"):
        split_rows([1], 0)
    with pytest.raises(ValueError, match="at least one token"):
        split_rows([3, 0], 2)


@given(
    lengths=st.lists(st.integers(min_value=1, max_value=50), max_size=40),
    world_size=st.integers(min_value=1, max_value=6),
)
def test_every_row_lands_once_and_ranks_stay_balanced(lengths: list[int], world_size: int) -> None:
    shares = split_rows(lengths, world_size)
    assert len(shares) == world_size
    assert sorted(i for share in shares for i in share) == list(range(len(lengths)))
    assert all(share == sorted(share) for share in shares)
    totals = [sum(lengths[i] for i in share) for share in shares]
    assert max(totals) - min(totals) <= max(lengths, default=0)
    assert split_rows(lengths, world_size) == shares  # deterministic


def test_split_for_ranks_weighs_trajectories_by_tokens() -> None:
    token = VersionToken(lease_id=0, version=0)

    def traj(index: int, n: int) -> Trajectory:
        turn = Turn(role="assistant", token_ids=[1] * n, loss_mask=[1] * n)
        return Trajectory(group_id="g", item_key="g", sample_index=index, token=token, turns=[turn])

    group = Group(
        group_id="g", item_key="g", token=token, trajectories=[traj(0, 2), traj(1, 10), traj(2, 3)]
    )
    assert split_for_ranks(TrainBatch(step=0, groups=[group]), 2) == [[1], [0, 2]]
