"""Runs that cannot train stop with a clear reason and a non-zero exit, and export nothing."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from nexrl_async.core.records import FailureReason
from nexrl_async.obs.ledger import RunFinished, Scored, Trained, read_events

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]

RECIPE = Path(__file__).parents[3] / "recipes" / "reverse_digits" / "recipe.toml"
FAULTS = Path(__file__).parent / "faults"
QUICK = [
    "logging.progress=false", "validation.before_training=false", "validation.at_end=false",
    "rollout.workers=4", "rollout.group_size=4", "pool.batch_groups=4",
]  # fmt: skip


def run(tmp_path: Path, *overrides: str, recipe: Path = RECIPE) -> tuple[int, str, float]:
    argv = [sys.executable, "-m", "nexrl_async", "run", str(recipe), "--output", str(tmp_path)]
    for override in (*QUICK, *overrides):
        argv += ["--set", override]
    started = time.monotonic()
    done = subprocess.run(argv, capture_output=True, text=True, timeout=200, check=False)
    return done.returncode, done.stderr, time.monotonic() - started


def test_an_evaluator_that_always_raises_stops_the_run(tmp_path: Path) -> None:
    recipe = tmp_path / "broken.toml"
    recipe.write_text(
        f'extends = "{RECIPE}"\n[rollout]\nevaluator = "{FAULTS / "always_fails.py"}:Broken"\n'
    )
    code, err, elapsed = run(tmp_path / "run", "faults.window_groups=16", recipe=recipe)
    assert code == 1, err
    assert "rollouts keep failing" in err
    assert "evaluator_error" in err
    assert elapsed < 120
    assert not (tmp_path / "run" / "final").exists()


def test_data_that_runs_out_before_the_first_step_is_an_error(tmp_path: Path) -> None:
    code, err, _ = run(tmp_path / "run", "data.kwargs.count=2")
    assert code == 1, err
    assert "the data ran out before the first training step" in err
    assert not (tmp_path / "run" / "final").exists()


def test_a_stuck_sync_evaluator_neither_stalls_the_run_nor_keeps_the_process_alive(
    tmp_path: Path,
) -> None:
    recipe = tmp_path / "hangs.toml"
    recipe.write_text(
        f'extends = "{RECIPE}"\n[rollout]\nevaluator = "{FAULTS / "hangs.py"}:HangsSometimes"\n'
    )
    out = tmp_path / "run"
    code, err, _ = run(out, "run.total_steps=3", "rollout.sample_timeout_s=2", recipe=recipe)
    ended = time.time()
    assert code == 0, err
    events = read_events(out / "events.jsonl")
    assert len([e for e in events if isinstance(e, Trained)]) == 3
    timeouts = [e for e in events if isinstance(e, Scored) and e.failure == FailureReason.TIMEOUT]
    assert timeouts, "some items should have hung"
    finished = events[-1]
    assert isinstance(finished, RunFinished)
    assert ended - finished.time < 10, "the process outlived the run by more than 10 s"


def test_a_server_that_is_healthy_but_never_generates_stops_the_run(tmp_path: Path) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    mute = subprocess.Popen(
        [sys.executable, "-m", "nexrl_async.testing.simulated", "--port", str(port),
         "--vocab-size", "13", "--eos-token-id", "1", "--token-latency-s", "100000",
         "--weight-version", "0"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        _wait_healthy(f"http://127.0.0.1:{port}", mute)
        code, err, elapsed = run(
            tmp_path / "run", 'inference.backend="attach"',
            f'inference.urls=["http://127.0.0.1:{port}"]',
            "faults.stall_warn_s=2", "faults.stall_restart_s=5",
        )  # fmt: skip
    finally:
        mute.kill()
        mute.wait()
    assert code == 1, err
    assert "do not generate" in err
    assert elapsed < 120


def _wait_healthy(url: str, process: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        assert process.poll() is None, "the simulated server exited"
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise AssertionError("the simulated server never became healthy")


def test_a_context_too_short_for_any_prompt_stops_the_run(tmp_path: Path) -> None:
    code, err, elapsed = run(tmp_path / "run", "model.max_position_embeddings=2")
    assert code == 1, err
    assert "prompt_rejected" in err
    assert err.count("rollouts keep failing") == 1  # one clear line, not one per worker
    assert elapsed < 120
