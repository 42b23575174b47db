"""Standard plots of a run, drawn from its ``metrics.jsonl`` into ``<run>/plots/<name>.png``.

Redrawn every few minutes while a run trains (``engine/reporting.py``) and written when the
run's records close (the run ended, however it ended: a stopped or failed run gets the plots of
the steps it logged). Plotting never fails a run: without matplotlib one
line says so, and a plot that cannot be drawn is skipped with a warning.

A plot is a :class:`Plot`: a file name, a title and the metric series it draws, named exactly
or by ``fnmatch`` pattern (``"val/*_mean"``). A plot none of whose series has a value is not
written, so RL runs get no SFT loss plot and the other way round. Extend the standard set by
passing your own tuple, e.g. ``write_plots(path, folder, (*STANDARD_PLOTS, Plot(...)))``, or
add an entry to :data:`STANDARD_PLOTS` for a metric every run may emit.

Only matplotlib's object API (``Figure`` with an Agg canvas) is used: no pyplot, so nothing
global (the backend of a notebook, say) changes.
"""

from __future__ import annotations

import fnmatch
import importlib.util
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loguru import logger

from nexrl_async.obs.metrics import read_metrics


@dataclass(frozen=True, kw_only=True)
class Plot:
    """One figure: every metric matching ``series`` (and none of ``exclude``) against step."""

    name: str
    """File name without ``.png``."""
    title: str
    series: tuple[str, ...]
    """Metric names or ``fnmatch`` patterns, drawn in this order."""
    exclude: tuple[str, ...] = ()
    """Patterns of metrics that ``series`` matches but this plot leaves out."""
    ylabel: str = ""
    logy: bool = False
    """Log-scaled y axis (skipped when a value is not positive)."""


STANDARD_PLOTS: tuple[Plot, ...] = (
    Plot(
        name="reward",
        title="Reward",
        series=("rollout/reward_mean", "val/reward_mean"),
        ylabel="reward",
    ),
    Plot(
        name="evaluator_metrics",
        title="Evaluator metrics (training samples and validation)",
        series=("rollout/*_mean", "val/*_mean"),
        exclude=(
            "rollout/reward_mean",
            "rollout/response_len_mean",
            "*/turns_mean",  # the agent plot
            "*/tool_calls_mean",
            "val/reward_mean",
            "val/*/*_mean",  # per data source: the data_* plots
        ),
        ylabel="mean",
    ),
    Plot(
        name="data_reward",
        title="Reward per data source (training batch and validation)",
        series=("data/*/reward_mean", "val/*/reward_mean"),
        ylabel="reward",
    ),
    Plot(
        name="data_drawn",
        title="Items drawn per data source",
        series=("data/*/drawn",),
        ylabel="items",
    ),
    Plot(
        name="agent",
        title="Agent loops: assistant turns and tool calls per sample, tool success",
        series=("rollout/turns_mean", "val/turns_mean", "*/tool_calls_mean", "*/tool_success_rate"),
    ),
    Plot(name="loss", title="Loss", series=("train/loss", "val/loss"), ylabel="loss"),
    Plot(
        name="preference",
        title="DPO: preference accuracy (implicit rewards)",
        series=("train/preference_accuracy", "val/preference_accuracy"),
        ylabel="fraction of pairs",
    ),
    Plot(name="entropy", title="Policy entropy", series=("train/entropy",), ylabel="nats"),
    Plot(name="kl", title="KL to the reference", series=("train/kl",), ylabel="nats"),
    Plot(
        name="staleness",
        title="Staleness of trained groups",
        series=("pipeline/staleness_mean", "pipeline/staleness_max"),
        ylabel="steps",
    ),
    Plot(
        name="throughput",
        title="Throughput",
        series=("throughput/tokens_per_s",),
        ylabel="generated tokens / s",
    ),
    Plot(
        name="step_time",
        title="Step time breakdown",
        series=("timing/step_s", "train/step_s", "pipeline/batch_wait_s", "weights/publish_s"),
        ylabel="seconds",
    ),
    Plot(
        name="response_length",
        title="Response length",
        series=("rollout/response_len_mean",),
        ylabel="tokens",
    ),
)
"""The plots every run gets (those with data)."""

Series = dict[str, tuple[list[int], list[float]]]


def collect(records: Sequence[Mapping[str, Any]], plot: Plot) -> Series:
    """``{metric: (steps, values)}`` of the metrics ``plot`` draws, finite values only."""
    names: list[str] = []
    keys = list(dict.fromkeys(k for r in records for k in r if k not in ("step", "time")))
    for pattern in plot.series:
        for key in keys:
            if fnmatch.fnmatchcase(key, pattern) and key not in names:
                if not any(fnmatch.fnmatchcase(key, ex) for ex in plot.exclude):
                    names.append(key)
    out: Series = {}
    for name in names:
        steps, values = [], []
        for record in records:
            value = record.get(name)
            if isinstance(value, int | float) and math.isfinite(value):
                steps.append(int(record["step"]))
                values.append(float(value))
        if values:
            out[name] = (steps, values)
    return out


def write_plots(
    metrics_path: Path, plots_dir: Path, plots: Sequence[Plot] = STANDARD_PLOTS
) -> list[Path]:
    """Draw ``plots`` from ``metrics_path`` into ``plots_dir``; return the files written.

    Never raises for a plotting problem: a missing matplotlib is one INFO line, a failing plot
    one WARNING; either way the others are still drawn.
    """
    if importlib.util.find_spec("matplotlib") is None:
        logger.info("plots skipped: matplotlib is not installed (pip install matplotlib)")
        return []
    try:
        records = read_metrics(metrics_path) if metrics_path.is_file() else []
    except OSError as err:
        logger.warning("plots skipped: cannot read {}: {}", metrics_path, err)
        return []
    written = []
    for plot in plots:
        series = collect(records, plot)
        if not series:
            continue
        path = plots_dir / f"{plot.name}.png"
        try:
            _draw(plot, series, path)
        except Exception as err:  # noqa: BLE001 - a figure must never take the run down
            logger.warning("plot {} failed: {}: {}", plot.name, type(err).__name__, err)
            continue
        written.append(path)
    if written:
        logger.debug("{} plots written to {}", len(written), plots_dir)
    return written


def _draw(plot: Plot, series: Series, path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(7, 4), dpi=100, layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    for name, (steps, values) in series.items():
        sparse = len(values) < 20  # validation points, or a short run: show each point
        axes.plot(steps, values, label=name, marker="o" if sparse else None, markersize=3)
    axes.set_title(plot.title)
    axes.set_xlabel("step")
    axes.set_ylabel(plot.ylabel)
    if plot.logy and all(v > 0 for _, values in series.values() for v in values):
        axes.set_yscale("log")
    axes.grid(alpha=0.3)
    axes.legend(fontsize="small")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".png.tmp")
    figure.savefig(tmp, format="png")
    tmp.replace(path)
