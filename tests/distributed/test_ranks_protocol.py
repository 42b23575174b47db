"""The rank protocol over two gloo ranks: a failure on any rank stops every rank, with that
rank's error, and nothing hangs.

Each test launches two ranks of ``ranks_driver.py`` (rank 0: ``make_trainer``'s
DistributedTrainer, rank 1: ``run_follower``) as subprocesses with torchrun's environment.

Run: ``.venv/bin/python -m pytest tests/distributed/test_ranks_protocol.py -q``
"""

from __future__ import annotations

import json
from pathlib import Path
from types import ModuleType

import pytest

DRIVER = Path(__file__).with_name("ranks_driver.py")
COLLECTIVE_TIMEOUT_S = 3.0

HOOK = """
import os


def prepare_batch(batch):
    if os.environ.get("RANK") == os.environ.get("FAIL_RANK"):
        raise RuntimeError(f"boom on rank {os.environ['RANK']}")
    return None
"""


@pytest.mark.distributed
@pytest.mark.timeout(240)
@pytest.mark.parametrize("fail_rank", [1, 0])
def test_a_failure_on_one_rank_stops_both_with_its_error(
    tmp_path: Path, driver: ModuleType, fail_rank: int
) -> None:
    (tmp_path / "hook.py").write_text(HOOK)
    driver.prepare(
        tmp_path,
        driver.recipe(
            algorithm={"prepare_batch": "hook.py:prepare_batch"},
            trainer={"collective_timeout_s": COLLECTIVE_TIMEOUT_S},
        ),
    )
    (rank0_code, rank0_out), (rank1_code, rank1_out) = driver.launch(
        "fail", tmp_path, timeout=180, FAIL_RANK=str(fail_rank)
    )
    # no "terminate called without an active exception" (SIGABRT) from gloo's teardown after
    # the timed-out collective: the processes end through core.process.exit_process
    assert rank0_code == 0, rank0_out[-4000:]
    assert rank1_code == 1, rank1_out[-4000:]  # the follower left its loop, reporting failure
    result = json.loads((tmp_path / "out" / "rank0.json").read_text())
    assert result["error"] == "RankFailure"
    message = result["message"]
    # the cause is the failing rank's own error, not the other rank's collective timeout
    assert f"failed on rank {fail_rank}: UserCodeError" in message
    assert f"boom on rank {fail_rank}" in message
    assert "Timed out" not in message
    # rank 0 waited at most about one collective timeout, then every later call fails at once
    assert result["seconds"] < COLLECTIVE_TIMEOUT_S + 15
    assert "stopped after a failure" in result["after"]
    assert f"boom on rank {fail_rank}" in rank1_out


@pytest.mark.distributed
@pytest.mark.timeout(240)
def test_a_follower_leaves_at_once_when_rank_0_dies(tmp_path: Path, driver: ModuleType) -> None:
    driver.prepare(tmp_path, driver.recipe())
    (rank0_code, rank0_out), (rank1_code, rank1_out) = driver.launch("die", tmp_path, timeout=180)
    assert rank0_code == 3, rank0_out[-4000:]
    assert rank1_code == 1, rank1_out[-4000:]
    assert "lost rank 0 while waiting for a command" in rank1_out
    out = tmp_path / "out"
    died_at = float((out / "died_at").read_text())
    # the command group's timeout is a week: only the closed connection can end the wait
    assert (out / "exit1").stat().st_mtime - died_at < 20.0
