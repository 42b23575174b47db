"""Reporting: samples of the last step are written once; plots are redrawn while a run trains."""

from __future__ import annotations

from pathlib import Path

import anyio

from nexrl_async.config.model import CharTokenizer
from nexrl_async.core.records import Group, TrainBatch, Trajectory, Turn, VersionToken
from nexrl_async.engine.reporting import Reporting
from nexrl_async.obs.metrics import JsonlMetrics
from nexrl_async.obs.progress import ProgressLine
from nexrl_async.train.build import build_char_tokenizer

TOKEN = VersionToken(lease_id=0, version=0)


def _batch(step: int) -> TrainBatch:
    turn = Turn(role="assistant", token_ids=[5, 6], loss_mask=[1, 1], text="12")
    traj = Trajectory(group_id="g", item_key="0:0", sample_index=0, token=TOKEN, turns=[turn])
    return TrainBatch(step=step, groups=[Group(group_id="g", item_key="0:0", token=TOKEN,
                                               trajectories=[traj])])  # fmt: skip


def _reporting(tmp_path: Path, *, every: int, plots_every_s: float = 300.0) -> Reporting:
    (tmp_path / "samples").mkdir(exist_ok=True)
    return Reporting(
        progress_line=ProgressLine(None, enabled=False),
        progress_keys={},
        validation_loss=None,
        samples_every=every,
        samples_dir=tmp_path / "samples",
        tokenizer=build_char_tokenizer(CharTokenizer()),
        metrics_path=tmp_path / "metrics.jsonl",
        plots_dir=tmp_path / "plots",
        plots_every_s=plots_every_s,
    )


def _dumped(tmp_path: Path) -> list[str]:
    """The JSONL dumps (each has its plain-text twin, ``.txt``)."""
    names = sorted(p.name for p in (tmp_path / "samples").iterdir())
    dumps = [n for n in names if n.endswith(".jsonl")]
    assert sorted(n.removesuffix(".txt") for n in names if n.endswith(".txt")) == [
        n.removesuffix(".jsonl") for n in dumps
    ]
    return dumps


def test_the_last_step_is_dumped_once_whatever_the_period(tmp_path: Path) -> None:
    reporting = _reporting(tmp_path, every=5)

    async def steps(*numbers: int) -> None:
        for step in numbers:
            await reporting.dump_samples(_batch(step))
        await reporting.dump_final()

    anyio.run(steps, 0, 1, 2, 3)
    assert _dumped(tmp_path) == ["step_000000.jsonl", "step_000003.jsonl"]
    anyio.run(steps, 4, 5)  # the last step was dumped by its period: not twice
    assert _dumped(tmp_path)[-1] == "step_000005.jsonl"
    assert len(_dumped(tmp_path)) == 3


def test_no_samples_when_turned_off(tmp_path: Path) -> None:
    reporting = _reporting(tmp_path, every=0)

    async def steps() -> None:
        await reporting.dump_samples(_batch(0))
        await reporting.dump_final()

    anyio.run(steps)
    assert _dumped(tmp_path) == []


def test_plots_are_redrawn_during_the_run_when_due(tmp_path: Path) -> None:
    sink = JsonlMetrics(tmp_path / "metrics.jsonl")
    for step in range(3):
        sink.log(step, {"rollout/reward_mean": step / 3, "timing/step_s": 0.5})
    sink.close()
    waiting = _reporting(tmp_path, every=0)
    anyio.run(waiting.dump_samples, _batch(2))
    assert not (tmp_path / "plots").exists()  # not due yet (every 300 s)
    due = _reporting(tmp_path, every=0, plots_every_s=0.0)
    anyio.run(due.dump_samples, _batch(2))
    assert {p.name for p in (tmp_path / "plots").iterdir()} == {"reward.png", "step_time.png"}
