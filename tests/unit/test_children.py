"""Children of the engine: forked early when that is safe, else spawned."""

from __future__ import annotations

import os
import threading
from multiprocessing.connection import Connection

import pytest

from nexrl_async.core import children
from nexrl_async.core.children import can_fork, early_child, fork_child, take_child


def echo(fd: int) -> int:
    """Answer one message with its length; exit 7."""
    conn = Connection(fd)
    conn.send(len(conn.recv_bytes()))
    return 7


@pytest.fixture
def single_thread() -> None:
    if not can_fork():
        pytest.skip("another thread runs in this test process")


def test_a_forked_child_serves_its_socket_and_exits_with_the_code(single_thread) -> None:
    child = fork_child(echo)
    conn = Connection(child.sock.detach())
    conn.send_bytes(b"hello")
    assert conn.recv() == 5
    assert child.process.wait(10) == 7
    assert child.process.returncode == 7


def test_a_forked_child_closes_inherited_pipes(single_thread) -> None:
    read_end, write_end = os.pipe()
    try:
        child = fork_child(lambda fd: 0)
        child.process.wait(10)
        os.close(write_end)
        assert os.read(read_end, 1) == b""  # no copy of the write end kept it open
    finally:
        os.close(read_end)


def test_an_error_in_the_child_exits_1(single_thread, capfd) -> None:
    def boom(fd: int) -> int:
        raise RuntimeError("boom")

    child = fork_child(boom)
    assert child.process.wait(10) == 1
    assert "RuntimeError: boom" in capfd.readouterr().err


def test_early_child_is_taken_once_and_discarded_when_untaken(single_thread) -> None:
    with early_child("some.module", echo, enabled=True):
        taken = take_child("some.module")
        assert taken is not None
        assert take_child("some.module") is None
        taken.discard()
    with early_child("some.module", echo, enabled=True):
        (left,) = children._pool["some.module"]
    assert left.process.returncode is not None
    with early_child("some.module", echo, enabled=False):
        assert take_child("some.module") is None


def test_no_fork_while_another_thread_runs() -> None:
    stop = threading.Event()
    thread = threading.Thread(target=stop.wait)  # noqa: TID251 - a thread is the point here
    thread.start()
    try:
        assert not can_fork()
        with early_child("some.module", echo, enabled=True):
            assert take_child("some.module") is None
    finally:
        stop.set()
        thread.join()


def test_a_dead_child_is_not_taken(single_thread) -> None:
    with early_child("some.module", lambda fd: 0, enabled=True):
        (child,) = children._pool["some.module"]
        child.process.wait(10)
        assert take_child("some.module") is None


def test_discard_kills_a_live_child(single_thread) -> None:
    child = fork_child(lambda fd: Connection(fd).recv_bytes() and 0)
    child.discard()
    assert child.process.returncode == -9
    with pytest.raises(OSError):
        child.sock.send(b"x")
