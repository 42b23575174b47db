"""plots/: standard figures drawn from metrics.jsonl, never failing the run."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest

from nexrl_async.obs.metrics import JsonlMetrics, read_metrics
from nexrl_async.obs.plots import STANDARD_PLOTS, Plot, collect, write_plots

PNG = b"\x89PNG\r\n\x1a\n"


def _metrics(path: Path, steps: int = 30) -> Path:
    sink = JsonlMetrics(path)
    for step in range(steps):
        row = {
            "rollout/reward_mean": step / steps,
            "rollout/exact_mean": step / (2 * steps),
            "rollout/response_len_mean": 3.0,
            "train/loss": 1.0 - step / steps,
            "train/entropy": math.nan if step == 3 else 2.0,
            "throughput/tokens_per_s": 100.0 + step,
            "timing/step_s": 0.5,
        }
        if step % 10 == 0:
            row["val/reward_mean"] = step / steps
            row["val/exact_mean"] = 0.5
        sink.log(step, row)
    sink.close()
    return path


def test_standard_plots_are_written_for_the_metrics_a_run_has(tmp_path: Path) -> None:
    metrics = _metrics(tmp_path / "metrics.jsonl")
    written = write_plots(metrics, tmp_path / "plots")
    names = {p.stem for p in written}
    assert {"reward", "evaluator_metrics", "loss", "entropy", "throughput"} <= names
    assert "kl" not in names  # no train/kl in this run: no empty figure
    assert "staleness" not in names
    for path in written:
        assert path.read_bytes().startswith(PNG)
        assert path.stat().st_size > 5000
    assert not list((tmp_path / "plots").glob("*.tmp"))


def test_series_skip_missing_and_non_finite_values_and_honour_exclusions(tmp_path: Path) -> None:
    records = read_metrics(_metrics(tmp_path / "metrics.jsonl"))
    evaluator = next(p for p in STANDARD_PLOTS if p.name == "evaluator_metrics")
    series = collect(records, evaluator)
    assert list(series) == ["rollout/exact_mean", "val/exact_mean"]
    assert series["val/exact_mean"][0] == [0, 10, 20]
    entropy = collect(records, Plot(name="e", title="e", series=("train/entropy",)))
    assert 3 not in entropy["train/entropy"][0]
    assert len(entropy["train/entropy"][0]) == 29


def test_a_caller_adds_its_own_plot(tmp_path: Path) -> None:
    metrics = _metrics(tmp_path / "metrics.jsonl")
    mine = Plot(name="mine", title="Step time", series=("timing/*",), ylabel="s", logy=True)
    written = write_plots(metrics, tmp_path / "plots", (mine,))
    assert [p.name for p in written] == ["mine.png"]


def test_without_matplotlib_one_line_and_no_failure(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, log_messages: list[str]
) -> None:
    metrics = _metrics(tmp_path / "metrics.jsonl")
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now fails
    assert write_plots(metrics, tmp_path / "plots") == []
    assert any("matplotlib is not installed" in m for m in log_messages)


def test_a_plot_that_cannot_be_written_is_skipped_with_a_warning(
    tmp_path: Path, log_messages: list[str]
) -> None:
    metrics = _metrics(tmp_path / "metrics.jsonl")
    blocker = tmp_path / "plots"
    blocker.write_text("a file where the folder should be")
    assert write_plots(metrics, blocker) == []
    assert any(m.startswith("WARNING plot reward failed") for m in log_messages)


def test_no_metrics_file_no_plots(tmp_path: Path) -> None:
    assert write_plots(tmp_path / "metrics.jsonl", tmp_path / "plots") == []
