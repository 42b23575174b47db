"""The train-step benchmark's summary table and plot (``benchmarks/train_step.py`` measures)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from harness import save_figure, table, use_agg_backend


def _verdict(passed: bool) -> str:
    return "PASS" if passed else "FAIL"


def print_summary(results: dict[str, Any]) -> None:
    step, padding, publish = (results.get(k) for k in ("step", "padding", "publish"))
    if step:
        base = step["runs"]["baseline"]["tokens_per_cpu_s"]
        rows = [
            [
                n,
                r["median_cpu_s"],
                r["median_wall_s"],
                r["tokens_per_cpu_s"],
                r["tokens_per_cpu_s"] / base,
            ]
            for n, r in step["runs"].items()
        ]
        print(
            f"\n(1) train step: {step['model']['params'] / 1e6:.2f}M params, "
            f"{step['batch']['tokens']} tokens/step, {step['batch']['micro_batches']} "
            f"micro-batches (log-prob gap {step['logprob_max_abs_diff']:.1e})"
        )
        print(table(["runner", "cpu s", "wall s", "tokens/cpu-s", "x baseline"], rows))
        r = step["ratios"]
        print(
            f"ours / baseline: {r['baseline_cpu']:.3f} by CPU, {r['baseline_wall']:.3f} by "
            f"wall (target >= {step['target']}: {_verdict(step['passed'])}); ours / "
            f"baseline+recompute: {r['baseline+recompute_cpu']:.3f} by CPU, "
            f"{r['baseline+recompute_wall']:.3f} by wall"
        )
        if step["phases_cpu_s"]:
            phases = step["phases_cpu_s"]
            labels = list(dict.fromkeys(label for found in phases.values() for label in found))
            rows = [[label, *(phases[n].get(label, math.nan) for n in phases)] for label in labels]
            print(table(["one profiled step, CPU s", *phases], rows))
    if padding:
        rows = [
            [
                b,
                *(out[k]["mean"] for k in ("packed", "padded", "pad_to_longest")),
                out["packed"]["max"],
            ]
            for b, out in padding["budgets"].items()
        ]
        print(f"\n(2) padding fraction: {padding['batches']} batches x {padding['rows']} rows")
        print(table(["budget", "packed", "padded mb", "pad to longest", "packed max"], rows))
        print(
            f"packed max at budget {padding['default_budget']}: "
            f"{padding['packed_max_at_default']:.2%} (target <= {padding['target']:.0%}: "
            f"{_verdict(padding['passed'])})"
        )
    if publish:
        model = publish["model"]
        print(
            f"\n(3) publication: {model['params'] / 1e6:.1f}M params, {model['dtype']}, "
            f"{model['bytes'] / 1e6:.0f} MB, one local server"
        )
        keys = (
            "median_total_s",
            "median_export_s",
            "median_transfer_s",
            "median_pause_s",
            "first_total_s",
            "gbytes_per_s",
        )
        rows = [[t, *(publish[t][k] for k in keys)] for t in ("disk", "distributed")]
        headers = ["transport", "total s", "prepare s", "transfer s", "paused s", "first s", "GB/s"]
        print(table(headers, rows))
        print(f"distributed: {publish['distributed_speedup']:.2f}x the speed of disk")


def plot(results: dict[str, Any], out_dir: Path, name: str) -> Path:
    """One panel per measured part."""
    use_agg_backend()
    import matplotlib.pyplot as plt

    drawers = {"step": _plot_step, "padding": _plot_padding, "publish": _plot_publish}
    parts = [k for k in drawers if results.get(k)]
    fig, axes = plt.subplots(1, len(parts), figsize=(5.6 * len(parts), 4.6), squeeze=False)
    for ax, part in zip(axes[0], parts, strict=True):
        drawers[part](ax, results[part])
    load = results["machine"]["load_avg"]
    fig.suptitle(
        f"train_step benchmark{' (--quick)' if results['quick'] else ''}: "
        f"{results['machine']['cpus']} CPUs, load avg {load[0] if load else '?'}"
    )
    fig.tight_layout()
    return save_figure(fig, out_dir, name)


def _plot_step(ax: Any, step: dict[str, Any]) -> None:
    names, tokens = list(step["runs"]), step["batch"]["tokens"]
    for j, clock in enumerate(("cpu", "wall")):
        xs = [i + (j - 0.5) * 0.4 for i in range(len(names))]
        heights = [step["runs"][n][f"tokens_per_{clock}_s"] for n in names]
        ax.bar(xs, heights, 0.4, label=f"by {clock} time", color=("tab:blue", "tab:gray")[j])
        for x, n in zip(xs, names, strict=True):
            points = [tokens / s for s in step["runs"][n][f"{clock}_s"]]
            ax.scatter([x] * len(points), points, color="black", s=8, zorder=3)
    target = step["target"] * step["runs"]["baseline"]["tokens_per_cpu_s"]
    ax.axhline(target, color="tab:red", ls="--", label=f"{step['target']} x baseline (CPU)")
    ax.set_xticks(range(len(names)), names)
    ax.set_ylabel("tokens / s (bars: median, dots: steps)")
    ax.set_title(
        f"(1) train step: ours = {step['ratio_vs_baseline']:.2f} x baseline (CPU)\n"
        f"{step['model']['params'] / 1e6:.1f}M params, {tokens} tokens/step"
    )
    ax.legend(fontsize=8, loc="lower left")


def _plot_padding(ax: Any, padding: dict[str, Any]) -> None:
    budgets = list(padding["budgets"])
    for j, layout in enumerate(("packed", "padded", "pad_to_longest")):
        means = [100 * padding["budgets"][b][layout]["mean"] for b in budgets]
        xs = [i + (j - 1) * 0.27 for i in range(len(budgets))]
        bars = ax.bar(xs, means, 0.27, label=layout.replace("_", " "))
        ax.bar_label(bars, fmt="%.1f", fontsize=7)
    target = 100 * padding["target"]
    ax.axhline(target, color="tab:red", ls="--", label=f"{target:g} % target")
    ax.set_xticks(range(len(budgets)), budgets)
    ax.set_xlabel("token budget per micro-batch")
    ax.set_ylabel("padding (% of token slots), mean")
    ax.set_title(
        f"(2) padding: {padding['rows']} rows x {padding['batches']} batches, long-tailed lengths"
    )
    ax.legend(fontsize=8)


def _plot_publish(ax: Any, publish: dict[str, Any]) -> None:
    names = ("disk", "distributed")
    medians = [publish[n] for n in names]
    prepare = [m["median_export_s"] for m in medians]
    transfer = [m["median_transfer_s"] for m in medians]
    rest = [m["median_total_s"] - p - t for m, p, t in zip(medians, prepare, transfer, strict=True)]
    ax.bar(names, prepare, label="prepare (disk: save_hf)")
    ax.bar(names, transfer, bottom=prepare, label="transfer")
    ax.bar(
        names,
        rest,
        bottom=[p + t for p, t in zip(prepare, transfer, strict=True)],
        label="hold, verify, flush, other",
    )
    ax.scatter(
        names,
        [m["first_total_s"] for m in medians],
        color="black",
        marker="x",
        label="first publication",
        zorder=3,
    )
    model = publish["model"]
    ax.set_ylabel("wall seconds per publication (median)")
    ax.set_title(
        f"(3) publish {model['params'] / 1e6:.0f}M params "
        f"({model['dtype']}, {model['bytes'] / 1e6:.0f} MB)"
    )
    ax.legend(fontsize=8)
