"""The pipeline benchmark's plot and summary table (``benchmarks/pipeline.py`` computes)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from harness import save_figure, table, use_agg_backend

_PARTS = (
    ("batch_wait_s", "waiting for the batch", "tab:orange"),
    ("train_and_rest_s", "train step + bookkeeping", "tab:blue"),
    ("publish_s", "weight publication", "tab:gray"),
)


def plot(results: dict[str, Any], out_dir: Path, name: str) -> Path:
    """Left: where each mode's mean step time goes, against the ideal and serial step times.
    Right: throughput relative to the ideal steady state, with the target."""
    use_agg_backend()
    import matplotlib.pyplot as plt

    modes, analysis = results["modes"], results["analysis"]
    labels = [m["label"].replace(" k=", "\nk=") for m in modes.values()]
    xs = list(range(len(labels)))
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 5.2))
    bottom = [0.0] * len(xs)
    for key, legend, color in _PARTS:
        heights = [max(m[key], 0.0) for m in modes.values()]
        left.bar(xs, heights, bottom=bottom, color=color, label=legend, alpha=0.85)
        bottom = [b + h for b, h in zip(bottom, heights, strict=True)]
    totals = [m["step_s"] for m in modes.values()]
    errors = [m["step_s_std"] for m in modes.values()]
    left.errorbar(xs, totals, yerr=errors, fmt="none", ecolor="black", capsize=4)
    _line(left, analysis["ideal_step_s"], "ideal max(T_gen, T_train)", "tab:green", "--")
    _line(left, analysis["serial_step_s"], "serial T_gen + T_train", "tab:red", ":")
    left.set_xticks(xs, labels)
    left.set_ylabel("mean step time (s)")
    left.set_title(
        f"step time (T_gen {analysis['t_gen_s']:.2f} s, T_train {analysis['t_train_s']:.2f} s)"
    )
    left.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=3)
    effs = [m["efficiency"] for m in modes.values()]
    bars = right.bar(xs, effs, color="tab:purple", alpha=0.8)
    for bar, m in zip(bars, modes.values(), strict=True):
        right.annotate(
            f"{m['steps_per_s']:.2f} step/s\n{m['tokens_per_s']:.0f} tok/s",
            (bar.get_x() + bar.get_width() / 2, bar.get_height() / 2),
            ha="center", va="center", fontsize=8, color="white",
        )  # fmt: skip
    _line(right, analysis["efficiency_target"], "target 0.9", "tab:red", "--")
    right.set_xticks(xs, labels)
    right.set_ylim(0, max([1.15, *[e * 1.2 for e in effs if math.isfinite(e)]]))
    right.set_ylabel("throughput / ideal")
    right.set_title("throughput relative to the ideal steady state")
    right.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.14))
    return save_figure(fig, out_dir, name)


def _line(ax: Any, y: float, label: str, color: str, style: str) -> None:
    if math.isfinite(y):
        ax.axhline(y, color=color, ls=style, label=label)


def print_summary(results: dict[str, Any]) -> None:
    analysis = results["analysis"]
    headers = ["mode", "step s", "median s", "steps/s", "tokens/s", "batch wait s",
               "publish s", "pause s", "group s", "floor s", "staleness", "vs ideal"]  # fmt: skip
    rows = [
        [m["label"], m["step_s"], m["step_s_median"], m["steps_per_s"], m["tokens_per_s"],
         m["batch_wait_s"], m["publish_s"], m["pause_s"], m["group_latency_s"],
         m["group_floor_s"], m["staleness_mean"], m["efficiency"]]
        for m in results["modes"].values()
    ]  # fmt: skip
    print(table(headers, rows))
    print(
        f"T_gen {analysis['t_gen_s']:.3f} s (sync batch wait), T_train {analysis['t_train_s']:.3f}"
        f" s, ideal {analysis['ideal_step_s']:.3f} s, serial {analysis['serial_step_s']:.3f} s"
    )
    if "batch_async_k1_efficiency" in analysis:
        verdict = "PASS" if analysis["batch_async_k1_passed"] else "FAIL"
        print(
            f"batch-async k=1: {analysis['batch_async_k1_efficiency']:.3f} of ideal "
            f"(target >= {analysis['efficiency_target']}): {verdict}"
        )
    if "sync_step_over_serial" in analysis:
        print(f"sync step / (T_gen + T_train) = {analysis['sync_step_over_serial']:.3f}")
