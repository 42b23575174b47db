"""The failure-rate breaker warns, then stops a run whose groups keep failing."""

from __future__ import annotations

import pytest
from loguru import logger

from nexrl_async.config.pipeline import FaultsConfig
from nexrl_async.core.errors import RolloutError
from nexrl_async.engine.breaker import FailureBreaker


def test_a_full_window_of_failures_stops_the_run_naming_the_reasons() -> None:
    breaker = FailureBreaker(FaultsConfig(window_groups=4))
    for _ in range(3):
        breaker.record(["evaluator_error"])  # the window is not full yet
    with pytest.raises(RolloutError, match=r"4 of the last 4 groups failed \(evaluator_error: 4"):
        breaker.record(["evaluator_error", "timeout"])


def test_a_successful_group_keeps_the_share_below_the_stop() -> None:
    breaker = FailureBreaker(FaultsConfig(window_groups=4, stop_failed_fraction=1.0))
    for _ in range(10):
        breaker.record(["timeout"])
        breaker.record(["timeout"])
        breaker.record(["timeout"])
        breaker.record(None)


def test_warns_once_per_crossing() -> None:
    lines: list[str] = []
    sink = logger.add(lines.append, level="WARNING", format="{message}")
    try:
        breaker = FailureBreaker(FaultsConfig(window_groups=4, warn_failed_fraction=0.25))
        for outcome in (None, ["bad_item"], ["bad_item"], ["bad_item"], None, None, None, None):
            breaker.record(outcome)
        breaker.record(["timeout"])  # below again, then above: a second warning
        breaker.record(["timeout"])
    finally:
        logger.remove(sink)
    assert len(lines) == 2, lines
    assert "bad_item" in lines[0]


def test_groups_trained_without_their_failed_samples_warn_but_never_stop() -> None:
    lines: list[str] = []
    sink = logger.add(lines.append, level="WARNING", format="{message}")
    try:
        breaker = FailureBreaker(FaultsConfig(window_groups=4, stop_failed_fraction=0.5))
        for _ in range(8):
            breaker.record(["evaluator_error"], trained=True)
    finally:
        logger.remove(sink)
    assert len(lines) == 1, lines
    assert "1 of the last 1 groups had failed samples (0 failed as a whole)" in lines[0]
    assert "evaluator_error: 1" in lines[0]


def test_groups_not_trained_count_towards_the_stop() -> None:
    breaker = FailureBreaker(FaultsConfig(window_groups=4, stop_failed_fraction=0.5))
    breaker.record(["timeout"], trained=True)
    breaker.record(["timeout"], trained=True)
    breaker.record(["timeout"])
    with pytest.raises(RolloutError, match=r"2 of the last 4 groups failed \(timeout: 4\)"):
        breaker.record(["timeout", "timeout"])  # reasons count once per group
