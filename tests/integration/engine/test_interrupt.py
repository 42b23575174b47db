"""Ctrl-C (and SIGTERM) during a run: quick exit, no child process left, a consistent folder."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from nexrl_async.obs.ledger import RunFinished, Trained, read_events
from nexrl_async.obs.metrics import read_metrics

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]

RECIPE = Path(__file__).parents[3] / "recipes" / "reverse_digits" / "recipe.toml"


def wait_for_training(events: Path, proc: subprocess.Popen[bytes], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert proc.poll() is None, "the run ended early"
        if events.exists() and any(isinstance(e, Trained) for e in read_events(events)):
            return
        time.sleep(0.2)
    raise AssertionError("no training step within the deadline")


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_signal_stops_the_run_cleanly(tmp_path: Path, signum: signal.Signals) -> None:
    out = tmp_path / "run"
    proc = subprocess.Popen(
        [sys.executable, "-m", "nexrl_async", "run", str(RECIPE), "--output", str(out),
         "--set", "logging.progress=false"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        wait_for_training(out / "events.jsonl", proc, timeout_s=90)
        children = psutil.Process(proc.pid).children(recursive=True)
        assert children, "the local inference server should be a child process"
        start = time.monotonic()
        proc.send_signal(signum)
        code = proc.wait(timeout=30)
        assert time.monotonic() - start < 10
        assert code == (143 if signum == signal.SIGTERM else 130)
        _, alive = psutil.wait_procs(children, timeout=5)
        assert not alive, f"left behind: {alive}"
    finally:
        if proc.poll() is None:
            proc.kill()
    events = read_events(out / "events.jsonl")
    assert isinstance(events[-1], RunFinished)
    assert events[-1].reason.startswith("interrupted")
    text = (out / "metrics.jsonl").read_text()
    assert not text or text.endswith("\n")
    read_metrics(out / "metrics.jsonl")  # every line parses
