"""Ending a process: a normal exit, or a flushed hard exit once teardown is marked unsafe."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from collections.abc import Iterator

import pytest

from nexrl_async.core import process


@pytest.fixture(autouse=True)
def _clean_mark() -> Iterator[None]:
    process.reset_unsafe_teardown()
    yield
    process.reset_unsafe_teardown()


def test_exit_process_is_a_normal_exit_by_default() -> None:
    assert process.unsafe_teardown() is None
    with pytest.raises(SystemExit) as info:
        process.exit_process(3)
    assert info.value.code == 3


def test_the_first_reason_is_kept() -> None:
    process.mark_unsafe_teardown("collective timed out")
    process.mark_unsafe_teardown("later")
    assert process.unsafe_teardown() == "collective timed out"


def run_snippet(body: str) -> subprocess.CompletedProcess[str]:
    code = textwrap.dedent(body)
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )


def test_after_the_mark_the_exit_skips_teardown_but_keeps_code_and_output() -> None:
    done = run_snippet(
        """
        import atexit, sys
        from nexrl_async.core.process import exit_process, mark_unsafe_teardown
        atexit.register(lambda: print("teardown ran"))
        print("before", end="")  # unflushed: exit_process must flush it
        sys.stderr.write("err line")
        mark_unsafe_teardown("test")
        exit_process(7)
        """
    )
    assert done.returncode == 7
    assert done.stdout == "before"  # flushed, and no atexit teardown
    assert done.stderr == "err line"


def test_without_the_mark_teardown_runs() -> None:
    done = run_snippet(
        """
        import atexit
        from nexrl_async.core.process import exit_process
        atexit.register(lambda: print("teardown ran"))
        exit_process(4)
        """
    )
    assert done.returncode == 4
    assert done.stdout.strip() == "teardown ran"


def test_a_rank_failure_marks_teardown_unsafe() -> None:
    from nexrl_async.train.ranks.commands import RankFailure

    RankFailure("train_step failed on rank 1: boom", rank=1)
    assert process.unsafe_teardown() == "train_step failed on rank 1: boom"
