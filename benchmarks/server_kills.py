"""Fault run: the demo with its inference server SIGKILLed at random moments, several times.

    python benchmarks/server_kills.py                  # 5 runs of 60 steps, 3 kills each
    python benchmarks/server_kills.py --runs 1 --steps 30 --kills 2

Each run is ``nexrl-async run recipes/reverse_digits/recipe.toml`` (default config, except
``run.total_steps`` and no validation) in a subprocess. While it trains, the benchmark SIGKILLs
the engine's local server at ``--kills`` random training steps; the fleet restarts it and the
weight publisher brings it to the current weights. A run passes when the process exits 0 after
every step and its event log shows no sample lost or duplicated: every admitted group is
trained once, or failed or dropped (its item replayed), or still in flight at the end; no group
is trained twice. Writes ``benchmarks/results/server_kills.json``.
"""

from __future__ import annotations

import argparse
import json
import random
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import psutil

from nexrl_async.obs.ledger import Admitted, Dropped, Failed, Trained, read_events

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "reverse_digits" / "recipe.toml"
RESULTS = ROOT / "benchmarks" / "results"


def server_pids(engine: psutil.Process) -> list[int]:
    return [
        child.pid
        for child in engine.children(recursive=True)
        if "nexrl_async.inference.local" in " ".join(child.cmdline())
    ]


def trained_steps(events: Path) -> int:
    if not events.exists():
        return 0
    return sum(isinstance(e, Trained) for e in read_events(events))


def one_run(out: Path, steps: int, kills: int, rng: random.Random) -> dict[str, Any]:
    argv = [
        sys.executable, "-m", "nexrl_async", "run", str(RECIPE), "--output", str(out),
        "--set", f"run.total_steps={steps}", "--set", "logging.progress=false",
        "--set", "validation.before_training=false", "--set", "validation.at_end=false",
        "--set", "validation.every_steps=0", "--set", "checkpoint.every_steps=0",
    ]  # fmt: skip
    at_steps = sorted(rng.sample(range(2, steps - 2), kills))
    started = time.monotonic()
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    engine = psutil.Process(proc.pid)
    killed: list[dict[str, float]] = []
    while proc.poll() is None:
        done = trained_steps(out / "events.jsonl")
        if at_steps and done >= at_steps[0]:
            pids = server_pids(engine)
            if pids:
                time.sleep(rng.uniform(0.0, 0.5))  # somewhere inside the step
                for pid in pids:
                    psutil.Process(pid).send_signal(signal.SIGKILL)
                killed.append({"step": float(done), "t_s": time.monotonic() - started})
                at_steps.pop(0)
        time.sleep(0.05)
    _, err = proc.communicate()
    return {
        "exit_code": proc.returncode,
        "wall_s": time.monotonic() - started,
        "kills": killed,
        "stderr_tail": err.decode(errors="replace")[-400:],
        **ledger_check(out / "events.jsonl", steps),
    }


def ledger_check(path: Path, steps: int) -> dict[str, Any]:
    events = read_events(path)
    admitted = [e.group_id for e in events if isinstance(e, Admitted)]
    trained = [g for e in events if isinstance(e, Trained) for g in e.group_ids]
    settled = {e.group_id for e in events if isinstance(e, Failed | Dropped)}
    twice = [g for g, n in Counter(trained).items() if n > 1]
    unaccounted = set(admitted) - set(trained) - settled
    return {
        "steps_trained": sum(isinstance(e, Trained) for e in events),
        "groups_admitted": len(admitted),
        "groups_trained": len(trained),
        "groups_failed_or_dropped": len(settled),
        "trained_twice": len(twice),
        "in_flight_at_end": len(unaccounted),
        "ok_ledger": not twice and len(set(admitted)) == len(admitted),
        "ok_steps": sum(isinstance(e, Trained) for e in events) == steps,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--kills", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    runs = []
    with tempfile.TemporaryDirectory(prefix="server-kills-") as work:
        for index in range(args.runs):
            result = one_run(Path(work) / f"run{index}", args.steps, args.kills, rng)
            runs.append(result)
            passed = result["exit_code"] == 0 and result["ok_ledger"] and result["ok_steps"]
            print(
                f"run {index}: exit {result['exit_code']}, {result['steps_trained']} steps, "
                f"{len(result['kills'])} kills at steps {[k['step'] for k in result['kills']]}, "
                f"trained twice {result['trained_twice']}, in flight at end "
                f"{result['in_flight_at_end']}, {result['wall_s']:.0f} s: "
                f"{'PASS' if passed else 'FAIL'}"
            )
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "server_kills.json").write_text(
        json.dumps({"args": vars(args), "runs": runs}, indent=1)
    )


if __name__ == "__main__":
    main()
