"""The train-step benchmark's summary table and plot (``benchmarks/train_step.py`` measures)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from harness import save_figure, table, use_agg_backend

LAYOUTS = ("packed", "packed_bound", "padded", "pad_to_longest")


def _verdict(passed: bool) -> str:
    return "PASS" if passed else "FAIL"


def print_summary(results: dict[str, Any]) -> None:
    for part, printer in (("step", _print_step), ("padding", _print_padding)):
        if results.get(part):
            printer(results[part])
    if results.get("publish"):
        _print_publish(results["publish"])


def _print_step(step: dict[str, Any]) -> None:
    for name, shape in step["shapes"].items():
        _print_shape(name, shape, step["target"])


def _print_shape(name: str, shape: dict[str, Any], target: float) -> None:
    batch, plan, model = shape["batch"], shape["plan"], shape["model"]
    print(
        f"\n(1) train step, {name}: {model['params'] / 1e6:.2f}M params, {batch['rows']} rows, "
        f"{batch['tokens']} tokens/step (padded to the longest: {batch['padded_slots']} slots); "
        f"ours: {plan['micro_batches']} {plan['layout']} micro-batch(es) of <= "
        f"{plan['micro_batch_tokens']} tokens (log-prob gap {shape['logprob_max_abs_diff']:.1e})"
    )
    ratios = shape["slowdowns"]
    rows = [
        [n, 1000 * r["median_cpu_s"], 1000 * r["median_wall_s"], ratios[n]["cpu"],
         ratios[n]["paired_cpu"], ratios[n]["wall"]]
        for n, r in shape["runs"].items()
    ]  # fmt: skip
    headers = ["runner", "cpu ms", "wall ms", "x baseline", "x paired", "x wall"]
    print(table(headers, rows))
    print(
        f"ours / baseline (plain padded torch step): {shape['slowdown_vs_baseline']:.3f} x its "
        f"CPU seconds (target <= {target}: {_verdict(shape['passed'])})"
    )
    phases = shape.get("phases_cpu_s")
    if phases:
        labels = list(dict.fromkeys(label for found in phases.values() for label in found))
        rows = [[label, *(phases[n].get(label, math.nan) for n in phases)] for label in labels]
        print(table(["one profiled step, CPU s", *phases], rows))


def _print_padding(padding: dict[str, Any]) -> None:
    print(
        f"\n(2) padding fraction, {padding['batches']} batches x {padding['rows']} rows (mean; max)"
    )
    rows = []
    for name, mix in padding["mixes"].items():
        m = mix["length_mix"]
        label = f"{name} (median {m['median']}, max {m['max']})"
        for budget, out in mix["budgets"].items():
            rows.append([label, budget, *(out[k]["mean"] for k in LAYOUTS), out["packed"]["max"]])
    print(table(["mix", "budget", "packed", "bound", "padded", "to longest", "packed max"], rows))
    print(
        f"packed max, RL mix, budget {padding['default_budget']}: "
        f"{padding['packed_max_at_default']:.2%} (target <= {padding['target']:.0%}: "
        f"{_verdict(padding['passed'])})"
    )


def _print_publish(publish: dict[str, Any]) -> None:
    model = publish["model"]
    print(
        f"\n(3) publication: {model['params'] / 1e6:.1f}M params, {model['dtype']}, "
        f"{model['bytes'] / 1e6:.0f} MB, one local server (wall s, median after the first)"
    )
    keys = (
        "median_total_s",
        "median_export_s",
        "median_transfer_s",
        "median_pause_s",
        "first_total_s",
        "gbytes_per_s",
    )
    rows = [
        [name, *(s[k] for k in keys), publish["speedup_vs_disk"][name]]
        for name, s in publish["transports"].items()
    ]
    headers = ["transport", "total", "prepare", "transfer", "paused", "first", "GB/s", "x disk"]
    print(table(headers, rows))


def plot(results: dict[str, Any], out_dir: Path, name: str) -> Path:
    """One panel per measured part."""
    use_agg_backend()
    import matplotlib.pyplot as plt

    drawers = {"step": _plot_step, "padding": _plot_padding, "publish": _plot_publish}
    parts = [k for k in drawers if results.get(k)]
    fig, axes = plt.subplots(1, len(parts), figsize=(6.2 * len(parts), 5.0), squeeze=False)
    for ax, part in zip(axes[0], parts, strict=True):
        drawers[part](ax, results[part])
    load = results["machine"]["load_avg"]
    quick = " (--quick)" if results["quick"] else ""
    load_text = f", load average {load[0]:.1f}" if load else ""
    fig.suptitle(f"train_step benchmark{quick}: {results['machine']['cpus']} CPUs{load_text}")
    fig.tight_layout()
    return save_figure(fig, out_dir, name)


def _plot_step(ax: Any, step: dict[str, Any]) -> None:
    """Per shape and runner: median step seconds / the baseline's (CPU bars, dots per step)."""
    shapes = list(step["shapes"])
    runners = list(step["shapes"][shapes[0]]["runs"])
    width = 0.8 / len(runners)
    for j, runner in enumerate(runners):
        xs = [i + (j - (len(runners) - 1) / 2) * width for i in range(len(shapes))]
        heights = [step["shapes"][s]["slowdowns"][runner]["cpu"] for s in shapes]
        bars = ax.bar(xs, heights, width, label=runner)
        ax.bar_label(bars, fmt="%.2f", fontsize=7)
        for x, s in zip(xs, shapes, strict=True):
            runs = step["shapes"][s]["runs"]
            base = runs["baseline"]["median_cpu_s"]
            points = [t / base for t in runs[runner]["cpu_s"]]
            ax.scatter([x] * len(points), points, color="black", s=6, zorder=3)
    ax.axhline(step["target"], color="tab:red", ls="--", label=f"target {step['target']} x")
    ax.set_xticks(range(len(shapes)), shapes)
    ax.set_ylabel("step CPU seconds / plain padded torch step's")
    ours = ", ".join(f"{s} {step['shapes'][s]['slowdown_vs_baseline']:.2f} x" for s in shapes)
    ax.set_title(f"(1) train step vs a plain padded torch step\nours: {ours}")
    ax.legend(fontsize=8)


def _plot_padding(ax: Any, padding: dict[str, Any]) -> None:
    labels, groups = [], []
    for name, mix in padding["mixes"].items():
        for budget, out in mix["budgets"].items():
            labels.append(f"{name}\n{budget}")
            groups.append(out)
    xs = range(len(groups))
    for j, layout in enumerate(("packed", "padded")):
        means = [100 * g[layout]["mean"] for g in groups]
        bars = ax.bar([x + (j - 0.5) * 0.4 for x in xs], means, 0.4, label=f"{layout} (mean)")
        ax.bar_label(bars, fmt="%.1f", fontsize=7)
    ax.scatter(
        [x - 0.2 for x in xs],
        [100 * g["packed"]["max"] for g in groups],
        marker="v",
        color="black",
        zorder=3,
        label="packed (max)",
    )
    ax.scatter(
        [x - 0.2 for x in xs],
        [100 * g["packed_bound"]["mean"] for g in groups],
        marker="_",
        s=200,
        color="tab:green",
        zorder=3,
        label="least possible (mean)",
    )
    target = 100 * padding["target"]
    ax.axhline(target, color="tab:red", ls="--", label=f"{target:g} % target")
    ax.set_xticks(list(xs), labels)
    ax.set_xlabel("length mix and token budget per micro-batch")
    ax.set_ylabel("padding (% of token slots)")
    ax.set_title(f"(2) padding: {padding['rows']} rows x {padding['batches']} batches")
    ax.legend(fontsize=8)


def _plot_publish(ax: Any, publish: dict[str, Any]) -> None:
    names = list(publish["transports"])
    stats = [publish["transports"][n] for n in names]
    prepare = [s["median_export_s"] for s in stats]
    transfer = [s["median_transfer_s"] for s in stats]
    rest = [s["median_total_s"] - p - t for s, p, t in zip(stats, prepare, transfer, strict=True)]
    labels = [n.replace("_", "\n") for n in names]
    ax.bar(labels, prepare, label="prepare (disk: save_hf)")
    ax.bar(labels, transfer, bottom=prepare, label="transfer")
    ax.bar(
        labels,
        rest,
        bottom=[p + t for p, t in zip(prepare, transfer, strict=True)],
        label="hold, verify, flush",
    )
    ax.scatter(
        labels,
        [s["first_total_s"] for s in stats],
        color="black",
        marker="x",
        label="first publication",
        zorder=3,
    )
    model = publish["model"]
    ax.set_ylim(bottom=0)
    ax.set_ylabel("wall seconds per publication (median after the first)")
    ax.set_title(
        f"(3) publish {model['params'] / 1e6:.0f}M params "
        f"({model['dtype']}, {model['bytes'] / 1e6:.0f} MB) into one server"
    )
    ax.legend(fontsize=8)
