"""The end-to-end benchmark's summary table and plot (``benchmarks/e2e.py`` measures)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from harness import save_figure, table, use_agg_backend

RUNS = ("engine", "loop")
ROWS = (
    ("s/step (median, steps >= {skip})", "s_per_step_median"),
    ("time to val >= {target} (s since start)", "time_to_target_s"),
    ("  ... since launch (loop: + a fresh process's imports)", "time_to_target_from_launch_s"),
    ("  ... since the step-0 validation (s)", "time_to_target_after_first_val_s"),
    ("  ... at step", "target_step"),
    ("step-0 validation done (s since start)", "first_validation_s"),
    ("final val/reward_mean", "final_val_reward_mean"),
    ("wall s (whole run)", "wall_s"),
    ("CPU s per step (whole run, all processes)", "cpu_s_per_step"),
)


def _value(run: dict[str, Any] | None, key: str) -> Any:
    if run is None:
        return math.nan
    value = run.get(key)
    return math.nan if value is None else value


def print_summary(results: dict[str, Any]) -> None:
    ratios = results.get("ratios_engine_over_loop", {})
    rows = []
    for label, key in ROWS:
        label = label.format(skip=results.get("skip_steps", 2), target=results.get("target"))
        cells = [_value(results.get(name), key) for name in RUNS]
        rows.append([label, *cells, ratios.get(key, math.nan)])
    print("\nend to end: the demo task by the engine and by a hand-written GRPO loop")
    print(table(["", "engine", "loop", "engine/loop"], rows))
    engine = results.get("engine")
    if engine:
        print(f"engine validation times: {engine['timing_source']}")
        started = engine.get("run_started_s")
        if started is not None:
            print(f"engine run_started event at {started:.1f} s after launch")
        parts = engine.get("median_parts_s", {})
        if parts:
            shown = ", ".join(f"{k} {v:.3f}" for k, v in parts.items())
            print(f"engine per-step medians (s): {shown}")
    runs = results.get("loop_runs") or []
    if len(runs) > 1:
        shown = ", ".join(f"{run['s_per_step_median']:.3f}" for run in runs)
        print(f"loop s/step, before and after the engine: {shown} (the table has their mean)")
    loop = results.get("loop")
    if loop and loop.get("median_parts_s"):
        shown = ", ".join(f"{k} {v:.3f}" for k, v in loop["median_parts_s"].items())
        print(f"loop per-step medians (s): {shown}")
    loads = {n: results[n]["load_avg_1m"] for n in RUNS if results.get(n, {}).get("load_avg_1m")}
    if loads:
        shown = "; ".join(f"{n} {a:.1f} -> {b:.1f}" for n, (a, b) in loads.items())
        print(f"1-minute load average before -> after each run: {shown}")
    code = results.get("git") or {}
    if code.get("commit"):
        dirty = " (src/ with uncommitted changes)" if code.get("src_dirty") else ""
        print(f"code: commit {code['commit'][:10]}{dirty}")
    gap = results.get("initial_weights_max_abs_diff")
    if gap is not None:
        print(f"initial weights, engine vs loop: max |diff| = {gap:.3g}")


def plot(results: dict[str, Any], out_dir: Path, name: str) -> Path:
    use_agg_backend()
    import matplotlib.pyplot as plt

    fig, (ax_val, ax_step) = plt.subplots(1, 2, figsize=(12, 4.5))
    for run_name in RUNS:
        run = results.get(run_name)
        if not run:
            continue
        vals = run["validations"]
        ax_val.plot(
            [v["time_s"] for v in vals], [v["reward_mean"] for v in vals], "o-", label=run_name
        )
        steps = run["steps"]
        ax_step.plot([s["step"] for s in steps], [s["step_s"] for s in steps], label=run_name)
    ax_val.axhline(results.get("target", 0.8), color="grey", linestyle="--", linewidth=0.8)
    ax_val.set_xlabel("wall seconds since start")
    ax_val.set_ylabel("val/reward_mean")
    ax_val.set_title("validation reward against wall time")
    ax_val.legend()
    ax_step.set_yscale("log")
    ax_step.set_xlabel("step")
    ax_step.set_ylabel("seconds per step (incl. validation when due)")
    ax_step.set_title("step time")
    ax_step.legend()
    return save_figure(fig, out_dir, name)
