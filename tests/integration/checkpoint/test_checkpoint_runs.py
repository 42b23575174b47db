"""Checkpoints and resume in real runs of the reverse-digits recipe (local server, tiny model).

One run, three processes (process start-up dominates the cost, so the phases share a run):

1. ``nexrl-async run`` with a checkpoint every step, killed with SIGKILL (the run and its
   server) right after its first checkpoint; a half-written ``step_000999.tmp`` is planted;
2. ``--resume auto`` in a new process: it resumes from the real checkpoint, not the ``.tmp``;
   SIGTERM after its first step: the step finishes, a checkpoint is written, exit code 143;
3. ``--resume auto`` again (in-process) to the end: ``at_end`` checkpoint, final HF export,
   ``keep_last``.

Each resume is checked against the invariant of ``engine.resume``: the admissions stitched at
the checkpoints equal the uninterrupted admission order, which is the data order here (nothing
is replayed: no group fails or is dropped); training continues at the checkpoint's step with
the servers on its policy version, and the staleness bound holds.
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import TypeVar

import psutil
import pytest

from nexrl_async.config.loader import load_recipe
from nexrl_async.data import open_source
from nexrl_async.engine.checkpointer import list_checkpoints, read_engine_state
from nexrl_async.engine.resume import AdmissionPoint, stitched_admissions
from nexrl_async.engine.run import run_recipe
from nexrl_async.obs.ledger import (
    Admitted,
    Checkpointed,
    Dropped,
    Event,
    Failed,
    Published,
    RunFinished,
    RunResumed,
    RunStarted,
    Trained,
    TurnGenerated,
    read_events,
)

pytestmark = [
    pytest.mark.slow,
    pytest.mark.timeout(150),
    pytest.mark.filterwarnings("ignore:torch.distributed is disabled"),
]

E = TypeVar("E", bound=Event)

RECIPE = Path(__file__).parents[3] / "recipes" / "reverse_digits" / "recipe.toml"
K = 1
SMALL = [
    "rollout.workers=4",
    "rollout.group_size=4",
    "pool.batch_groups=4",
    f"staleness.max_staleness={K}",
    "logging.progress=false",
    "logging.samples_every_steps=0",
    "validation.every_steps=0",
    "validation.before_training=false",
    "validation.at_end=false",
]
"""4 groups of 4 samples per step, k = 1, no validation."""


def processes(events: list[Event]) -> list[list[Event]]:
    """The ledger split per process (each process starts with ``run_started``)."""
    out: list[list[Event]] = []
    for event in events:
        if isinstance(event, RunStarted) or not out:
            out.append([])
        out[-1].append(event)
    return out


def of_type(events: list[Event], kind: type[E]) -> list[E]:
    return [e for e in events if isinstance(e, kind)]


def admission_order(events: list[Event]) -> list[str]:
    """Item keys in lease order (one process)."""
    return [e.item_key for e in sorted(of_type(events, Admitted), key=lambda e: e.lease_id)]


@pytest.fixture(scope="module")
def data_order() -> list[str]:
    """The first keys the recipe's data source hands out when nothing is replayed."""
    recipe = load_recipe(RECIPE, SMALL)
    source = open_source(recipe.config.data, base_dir=recipe.base_dir)
    return [item.key for item in (source.next_item() for _ in range(200)) if item is not None]


SLOW = f'rollout.evaluator="{Path(__file__).with_name("slow_task.py")}:SlowReverseEvaluator"'
"""Rollouts slower than a train step: checkpoints find groups in flight."""


def launch(out: Path, *args: str) -> subprocess.Popen[bytes]:
    sets = [a for s in [*SMALL, SLOW, "run.total_steps=50"] for a in ("--set", s)]
    command = [sys.executable, "-m", "nexrl_async", "run", str(RECIPE), "--output", str(out)]
    return subprocess.Popen(
        [*command, *sets, *args], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )


def wait_for(
    proc: subprocess.Popen[bytes], events: Path, kind: type[Event], after: int, timeout_s: float
) -> None:
    """Until the ledger holds a ``kind`` event past its first ``after`` events."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert proc.poll() is None, "the run ended early"
        if events.exists() and of_type(read_events(events)[after:], kind):
            return
        time.sleep(0.1)
    raise AssertionError(f"no {kind.__name__} event within {timeout_s}s")


def kill_everything(proc: subprocess.Popen[bytes]) -> None:
    """SIGKILL the run process and every process under it (its inference server)."""
    family = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
    assert len(family) > 1, "the local inference server should be a child process"
    for member in family:
        member.kill()
    _, alive = psutil.wait_procs(family, timeout=10)
    assert not alive


def test_kill_resume_sigterm_resume_to_the_end(tmp_path: Path, data_order: list[str]) -> None:
    out = tmp_path / "run"
    ledger, checkpoints = out / "events.jsonl", out / "checkpoints"
    first = launch(out, "--set", "checkpoint.every_steps=1")
    try:
        wait_for(first, ledger, Checkpointed, after=0, timeout_s=90)
        kill_everything(first)
    finally:
        first.kill()
        first.wait()
    killed_at = of_type(read_events(ledger), Checkpointed)[-1]  # auto must pick the newest
    points = [AdmissionPoint.of(read_engine_state(Path(killed_at.path)))]
    assert points[0].in_flight, "the slow evaluator should keep groups in flight at the checkpoint"
    shutil.copytree(killed_at.path, checkpoints / "step_000999.tmp")  # never a candidate

    done = len(read_events(ledger))
    second = launch(out, "--set", "checkpoint.every_steps=0", "--resume", "auto")
    try:
        wait_for(second, ledger, Trained, after=done, timeout_s=90)
        second.send_signal(signal.SIGTERM)
        assert second.wait(timeout=60) == 143  # 128 + SIGTERM
    finally:
        second.kill()
        second.wait()
    runs = processes(read_events(ledger))
    check_resumed(runs[1], Path(killed_at.path), killed_at.step)
    # SIGTERM: the step under way finished, then a checkpoint of the state after it
    stopped_at = of_type(runs[1], Checkpointed)[-1]
    assert stopped_at.step == max(e.step for e in of_type(runs[1], Trained)) + 1
    assert isinstance(runs[1][-1], RunFinished)
    assert runs[1][-1].reason == "interrupted (SIGTERM)"
    assert not list(checkpoints.glob("*.tmp"))  # the planted leftover was cleaned up
    points.append(AdmissionPoint.of(read_engine_state(Path(stopped_at.path))))

    last = stopped_at.step + 2
    overrides = [*SMALL, f"run.total_steps={last}", "checkpoint.keep_last=1"]
    assert run_recipe(load_recipe(RECIPE, overrides), output=out, resume="auto") == "completed"
    runs = processes(read_events(ledger))
    check_resumed(runs[2], Path(stopped_at.path), stopped_at.step)
    assert [e.step for e in of_type(runs[2], Checkpointed)] == [last]  # at_end
    assert [p.name for _, p in list_checkpoints(checkpoints)] == [f"step_{last:06d}"]
    assert (out / "final" / "model.safetensors").is_file()
    check_admissions(runs, points, data_order)


def check_resumed(events: list[Event], checkpoint: Path, step: int) -> None:
    """Resumed from ``checkpoint``, trained from ``step`` on, its fleet on version >= ``step``."""
    started = events[0]
    assert isinstance(started, RunStarted)
    assert started.resumed_from == str(checkpoint)
    assert [(e.step, e.path) for e in of_type(events, RunResumed)] == [(step, str(checkpoint))]
    trained = of_type(events, Trained)
    assert [e.step for e in trained] == list(range(step, step + len(trained)))
    assert trained, "the resumed process trained nothing"
    for event in trained:
        assert all(0 <= s <= K for s in event.staleness), event
        assert event.staleness == [event.step - h for h in event.head_versions]
    published = [e.version for e in of_type(events, Published)]
    assert published == list(range(step + 1, step + 1 + len(published)))
    assert min(e.weight_version for e in of_type(events, TurnGenerated)) >= step


def check_admissions(
    runs: list[list[Event]], points: list[AdmissionPoint], data_order: list[str]
) -> None:
    """Stitched at each checkpoint, the admissions are the uninterrupted (data) order."""
    for run in runs:
        assert not of_type(run, Failed)
        assert not of_type(run, Dropped)
    stitched = stitched_admissions([of_type(run, Admitted) for run in runs], points)
    assert len(stitched) > points[-1].leases_issued  # the last process admitted new items
    assert stitched == data_order[: len(stitched)]
