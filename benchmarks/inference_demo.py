"""(c) of ``benchmarks/inference.py``: the demo's seconds per step and event-loop CPU per sample.

Runs the reverse-digits demo (``recipes/reverse_digits/recipe.toml``, 32 groups x 8 samples a
step) shortened with ``--set run.total_steps=N`` as ``python -m nexrl_async run`` in a
subprocess, and samples every 0.2 s the CPU time of its main thread, which is the engine's
event loop (``anyio.run`` on the main thread; torch works in worker threads), and of the
inference server, from ``/proc`` (Linux only), next to the step records of ``metrics.jsonl``.

Reported per run, over the steps after ``--demo-warmup-steps``: the median ``timing/step_s``,
the loop's CPU per sample (loop CPU between the first and the last counted step, divided by
the samples trained in between, validation samples included) and the server's CPU per sample.
``--demo-src`` runs the same measurement on other source trees (e.g. an older checkout's
``src``), alternating with this one round by round, so that a before/after comparison shares
the machine's load. Target: at most 0.5 ms of loop CPU per sample.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "recipes" / "reverse_digits" / "recipe.toml"
LOOP_TARGET_MS = 0.5
"""Event-loop CPU per sample, ms."""
_TICK_S = 1.0 / os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 0.01


@dataclass
class Sample:
    """One reading: wall time, steps logged so far, loop and server CPU seconds."""

    wall_s: float
    steps: int
    loop_cpu_s: float
    server_cpu_s: float


@dataclass
class DemoRun:
    src: str
    samples: list[Sample] = field(default_factory=list)
    metrics: list[dict[str, Any]] = field(default_factory=list)


def thread_cpu_s(pid: int, tid: int) -> float:
    """utime + stime of one thread, from ``/proc`` (0 once it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/task/{tid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) * _TICK_S


def process_cpu_s(processes: list[psutil.Process]) -> float:
    total = 0.0
    for proc in processes:
        try:
            times = proc.cpu_times()
        except psutil.Error:
            continue
        total += times.user + times.system
    return total


def count_lines(path: Path) -> int:
    try:
        with path.open("rb") as handle:
            return sum(1 for _ in handle)
    except OSError:
        return 0


def run_demo(out: Path, steps: int, src: str | None, timeout_s: float) -> DemoRun:
    """One shortened demo run in a subprocess, sampled until it exits."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if src:
        env["PYTHONPATH"] = os.pathsep.join([src, env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    argv = [sys.executable, "-m", "nexrl_async", "run", str(RECIPE), "--output", str(out),
            "--set", f"run.total_steps={steps}", "--set", "logging.progress=false"]  # fmt: skip
    run = DemoRun(src=src or "this checkout")
    with (out.parent / f"{out.name}.log").open("wb") as log:
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO)
    parent = psutil.Process(proc.pid)
    start = time.monotonic()
    try:
        while proc.poll() is None:
            if time.monotonic() - start > timeout_s:
                raise TimeoutError(f"demo run in {out} took over {timeout_s} s")
            servers = parent.children(recursive=True)
            run.samples.append(Sample(
                wall_s=time.monotonic() - start, steps=count_lines(out / "metrics.jsonl"),
                loop_cpu_s=thread_cpu_s(proc.pid, proc.pid),
                server_cpu_s=process_cpu_s(servers),
            ))  # fmt: skip
            time.sleep(0.2)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    if proc.returncode != 0:
        raise RuntimeError(f"demo run failed ({proc.returncode}); log: {out.parent}/{out.name}.log")
    run.metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return run


def summarize(run: DemoRun, warmup_steps: int) -> dict[str, Any]:
    """Median s/step and CPU per sample over the steps after the warm-up (see the docstring)."""
    steps = [m for m in run.metrics if "timing/step_s" in m]
    counted = steps[warmup_steps:]
    first, last = warmup_steps + 1, len(steps)  # metrics.jsonl lines bounding the window
    at_first = next(s for s in run.samples if s.steps >= first)
    at_last = next((s for s in run.samples if s.steps >= last), run.samples[-1])
    samples = sum(m.get("rollout/samples", 0.0) + m.get("val/samples", 0.0) for m in counted[1:])
    loop_s = at_last.loop_cpu_s - at_first.loop_cpu_s
    server_s = at_last.server_cpu_s - at_first.server_cpu_s
    return {
        "src": run.src,
        "steps_counted": len(counted),
        "step_s_median": statistics.median(m["timing/step_s"] for m in counted),
        "loop_cpu_ms_per_sample": 1e3 * loop_s / max(samples, 1.0),
        "server_cpu_ms_per_sample": 1e3 * server_s / max(samples, 1.0),
        "samples": samples,
        "window_wall_s": at_last.wall_s - at_first.wall_s,
    }


def run_demo_part(args: Any, work: Path) -> dict[str, Any]:
    """``args.demo_rounds`` rounds over this checkout and every ``--demo-src`` tree."""
    sources: list[str | None] = [None, *args.demo_src]
    rows: list[dict[str, Any]] = []
    print(f"(c) demo: {args.demo_steps} steps, sources {sources}", flush=True)
    for round_index in range(args.demo_rounds):
        for index, src in enumerate(sources):
            out = work / f"demo-r{round_index}-s{index}"
            run = run_demo(out, args.demo_steps, src, timeout_s=args.demo_timeout_s)
            row = {"round": round_index, **summarize(run, args.demo_warmup_steps)}
            rows.append(row)
            print(f"  round {round_index} {row['src']}: {row['step_s_median']:.3f} s/step, "
                  f"loop {row['loop_cpu_ms_per_sample']:.3f} ms/sample", flush=True)  # fmt: skip
    by_src: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        by_src.setdefault(row["src"], []).append(row)
    medians = {
        src: {key: statistics.median(r[key] for r in mine)
              for key in ("step_s_median", "loop_cpu_ms_per_sample", "server_cpu_ms_per_sample")}
        for src, mine in by_src.items()
    }  # fmt: skip
    mine = medians["this checkout"]
    return {
        "settings": {"steps": args.demo_steps, "warmup_steps": args.demo_warmup_steps,
                     "rounds": args.demo_rounds, "recipe": str(RECIPE.relative_to(REPO))},
        "runs": rows,
        "medians": medians,
        "target_loop_ms": LOOP_TARGET_MS,
        "passed": mine["loop_cpu_ms_per_sample"] <= LOOP_TARGET_MS,
    }  # fmt: skip
