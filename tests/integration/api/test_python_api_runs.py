"""The Python API end to end: the example script, a notebook-style call, cancellation, and a
start that fails before its first step."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import anyio
import pytest

import nexrl_async
from nexrl_async.config.loader import load_recipe
from nexrl_async.core.errors import ConfigError
from nexrl_async.engine.run import run_recipe
from nexrl_async.obs.ledger import RunFinished, read_events

ROOT = Path(__file__).parents[3]
RECIPE = ROOT / "recipes" / "reverse_digits" / "recipe.toml"
SMALL = {
    "rollout.workers": 4,
    "rollout.group_size": 4,
    "pool.batch_groups": 4,
    "logging.progress": False,
    "validation.every_steps": 0,
    "validation.before_training": False,
    "validation.at_end": False,
    "checkpoint.every_steps": 0,
}


def reverse_reward(item: Any, trajectory: Any) -> float:
    """A plain function as the evaluator: 1 for the exact reversal."""
    return float(trajectory.response_text.strip() == item.fields["answer"])


def rows(count: int) -> list[dict[str, str]]:
    texts = [f"{i % 100:02d}" for i in range(count)]
    return [{"prompt": f"<bos>{t}<sep>", "answer": t[::-1]} for t in texts]


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_the_example_trains_from_a_script(tmp_path: Path) -> None:
    path = os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, "PYTHONPATH": path}
    done = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "train_api.py"), "--steps", "3", "--small",
         "--output", str(tmp_path / "run")],
        capture_output=True, text=True, timeout=220, check=False, env=env,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert summary["reason"] == "completed"
    assert summary["steps_seen_by_callback"] == 3
    assert len(summary["first_rewards"]) == 3
    assert 0.0 <= summary["val/reward_mean"] <= 1.0
    assert (tmp_path / "run" / "final" / "config.json").is_file()


class StopAfter:
    """Stops the run after ``steps`` steps; records where callbacks ran."""

    def __init__(self, steps: int) -> None:
        self.steps = steps
        self.ends: list[int] = []
        self.checkpoints: list[int] = []
        self.threads: set[str] = set()

    def on_step_end(self, event: nexrl_async.StepEnd, run: nexrl_async.RunControl) -> None:
        self.threads.add(threading.current_thread().name)
        self.ends.append(event.step)
        if event.steps_done == self.steps:
            run.stop("enough")

    def on_checkpoint(self, event: nexrl_async.Checkpoint, run: nexrl_async.RunControl) -> None:
        self.checkpoints.append(event.step)
        assert event.path.is_dir()


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_train_under_a_running_loop_with_objects_and_a_stopping_callback(tmp_path: Path) -> None:
    stopper = StopAfter(2)
    recipe = {"extends": str(RECIPE), "rollout": {"evaluator": reverse_reward}, "data": rows(200)}

    async def notebook_cell() -> nexrl_async.RunResult:
        return nexrl_async.train(  # a blocking call while this loop runs, as in a notebook
            recipe, output=tmp_path / "run", overrides={**SMALL, "run.total_steps": 50},
            callbacks=[stopper],
        )  # fmt: skip

    result = asyncio.run(notebook_cell())
    assert result.reason == "stopped (enough)"
    assert stopper.ends == [0, 1]
    assert stopper.checkpoints == [2]  # the graceful stop's checkpoint
    assert stopper.threads
    assert "MainThread" not in stopper.threads
    assert [row["step"] for row in result.history] == [0, 1]
    assert "rollout/reward_mean" in result.metrics
    events = read_events(result.run_dir / "events.jsonl")
    assert isinstance(events[-1], RunFinished)
    assert events[-1].reason == "stopped (enough)"
    assert not any(name.startswith("nexrl_py_") for name in sys.modules)  # released


@pytest.mark.slow
@pytest.mark.timeout(240)
async def test_cancelling_train_async_stops_the_run_gracefully(tmp_path: Path) -> None:
    first_step = threading.Event()

    def on_step(event: Any, run: nexrl_async.RunControl) -> None:
        first_step.set()

    async def train() -> None:
        await nexrl_async.train_async(
            RECIPE, output=tmp_path / "run", overrides={**SMALL, "run.total_steps": 100},
            callbacks=[on_step],
        )  # fmt: skip

    async with anyio.create_task_group() as tg:
        tg.start_soon(train)
        assert await anyio.to_thread.run_sync(first_step.wait, 200)
        tg.cancel_scope.cancel()
    events = read_events(tmp_path / "run" / "events.jsonl")
    assert isinstance(events[-1], RunFinished)  # the run ended before train_async returned
    assert events[-1].reason == "stopped (cancelled)"
    assert list((tmp_path / "run" / "checkpoints").iterdir())


def test_a_start_that_fails_before_its_first_step_leaves_the_folder_reusable(
    tmp_path: Path,
) -> None:
    loaded = load_recipe(RECIPE, ["logging.progress=false"])
    out = tmp_path / "run"

    def no_trainer(spec: Any) -> Any:
        raise RuntimeError("the GPU fell off the bus")

    for _ in range(2):  # the second start is not refused with "already holds a run"
        with pytest.raises(BaseException) as info:  # the RuntimeError, maybe in a group
            run_recipe(loaded, output=out, trainer_factory=no_trainer)
        assert "fell off the bus" in repr(info.value)
    assert len(list((out / "failed_starts").iterdir())) == 1
    last = read_events(out / "events.jsonl")[-1]
    assert isinstance(last, RunFinished)
    assert (last.reason, last.step) == ("error", 0)


def test_a_bad_recipe_is_a_config_error_before_anything_starts(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"logging\.tensorboard"):
        nexrl_async.train(RECIPE, output=tmp_path / "run", overrides={"logging.tensorboard": True})
    assert not (tmp_path / "run").exists()
