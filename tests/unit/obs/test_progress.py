from __future__ import annotations

import io

import pytest

from nexrl_async.obs import ProgressLine, Terminal, format_progress

ERASE = "\r\x1b[2K"


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_format_lists_what_is_known() -> None:
    line = format_progress(12, 100, 0.5321, 1.5, 1234.0, 184.0)
    assert line == "step 12/100 | reward 0.532 | stale 1.5 | 1.2k tok/s | eta 3m04s"
    assert format_progress(3, None, None, None, None, None) == "step 3"
    assert format_progress(1, 2, None, None, 12.0, 7300.0) == "step 1/2 | 12 tok/s | eta 2h01m"
    line = format_progress(5, 10, None, None, None, 4.0, loss=0.012345)
    assert line == "step 5/10 | loss 0.01235 | eta 4s"


def test_tty_redraws_in_place_with_eta() -> None:
    buffer = io.StringIO()
    clock = FakeClock()
    progress = ProgressLine(10, terminal=Terminal(buffer, is_tty=True), clock=clock)
    progress.update(0, reward=0.1)
    clock.now = 10.0
    progress.update(2, reward=0.2, tokens_per_s=500.0)
    out = buffer.getvalue()
    assert out.count(ERASE) == 2
    assert "\n" not in out
    assert out.endswith(ERASE + "step 2/10 | reward 0.200 | 500 tok/s | eta 40s")
    progress.close()
    assert buffer.getvalue().endswith("\n")  # the last line stays on screen


def test_tty_redraws_are_rate_limited_but_the_last_step_always_shows() -> None:
    buffer = io.StringIO()
    clock = FakeClock()
    progress = ProgressLine(3, terminal=Terminal(buffer, is_tty=True), redraw_s=1.0, clock=clock)
    progress.update(1)
    clock.now = 0.5
    progress.update(2)
    assert buffer.getvalue().count(ERASE) == 1
    assert progress.last_line.startswith("step 2/3")
    clock.now = 0.6
    progress.update(3)
    assert buffer.getvalue().endswith("step 3/3 | eta 0s")


def test_log_lines_scroll_above_the_status_row() -> None:
    buffer = io.StringIO()
    terminal = Terminal(buffer, is_tty=True)
    progress = ProgressLine(5, terminal=terminal, clock=FakeClock())
    progress.update(1)
    terminal.write("a log line\n")
    assert buffer.getvalue().endswith(ERASE + "a log line\n" + "step 1/5")


def test_not_a_tty_gives_periodic_log_lines(log_messages: list[str]) -> None:
    buffer = io.StringIO()
    clock = FakeClock()
    progress = ProgressLine(
        4, terminal=Terminal(buffer, is_tty=False), log_every_s=30.0, clock=clock
    )
    for step in range(1, 5):
        clock.now = step * 10.0
        progress.update(step, reward=1.0)
    progress.close()
    shown = [m for m in log_messages if "progress |" in m]
    assert [m.split("progress | ")[1].split(" |")[0] for m in shown] == ["step 1/4", "step 4/4"]
    assert all(m.startswith("INFO") for m in shown)
    assert buffer.getvalue() == ""  # nothing drawn in place


def test_disabled_progress_is_silent(log_messages: list[str]) -> None:
    buffer = io.StringIO()
    progress = ProgressLine(2, terminal=Terminal(buffer, is_tty=True), enabled=False)
    progress.update(1)
    progress.update(2)
    progress.close()
    assert buffer.getvalue() == ""
    assert not any("progress" in m for m in log_messages)


def test_status_is_cut_to_the_terminal_width(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "20")
    buffer = io.StringIO()
    Terminal(buffer, is_tty=True).show_status("x" * 50)
    shown = buffer.getvalue().removeprefix(ERASE)
    assert len(shown) < 20
    assert shown.endswith("…")
