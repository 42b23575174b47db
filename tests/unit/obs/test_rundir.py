from __future__ import annotations

from pathlib import Path

import pytest

from nexrl_async.core.errors import ConfigError
from nexrl_async.obs import RunDir


def test_create_makes_the_layout(tmp_path: Path) -> None:
    run = RunDir.create(tmp_path / "runs" / "demo", resume=False)
    root = tmp_path / "runs" / "demo"
    assert run.root == root
    for folder in (run.samples_dir, run.checkpoints_dir, run.plots_dir, run.logs_dir):
        assert folder.is_dir()
        assert folder.parent == root
    assert run.weights_dir.is_dir()
    assert run.config_path == root / "config.toml"
    assert run.metrics_path == root / "metrics.jsonl"
    assert run.events_path == root / "events.jsonl"
    assert run.tensorboard_dir == root / "tensorboard"


def test_an_empty_existing_folder_is_fine(tmp_path: Path) -> None:
    RunDir.create(tmp_path, resume=False)
    assert (tmp_path / "checkpoints").is_dir()


def test_a_used_folder_is_refused_unless_resuming(tmp_path: Path) -> None:
    run = RunDir.create(tmp_path / "r", resume=False)
    run.metrics_path.write_text('{"step":0}\n')
    with pytest.raises(ConfigError, match=r"run\.output_dir.*already holds a run") as info:
        RunDir.create(tmp_path / "r", resume=False)
    assert info.value.path == "run.output_dir"
    again = RunDir.create(tmp_path / "r", resume=True)
    assert again.metrics_path.read_text() == '{"step":0}\n'  # nothing was wiped


def test_a_file_in_the_way_is_refused(tmp_path: Path) -> None:
    (tmp_path / "r").write_text("not a folder")
    with pytest.raises(ConfigError, match="not a folder"):
        RunDir.create(tmp_path / "r", resume=True)


def test_building_a_rundir_touches_no_disk(tmp_path: Path) -> None:
    run = RunDir(tmp_path / "nothing")
    assert not run.root.exists()
    assert "nothing" in repr(run)


def _failed_start(root: Path, *, trained: bool = False) -> None:
    from nexrl_async.obs.ledger import RunFinished, RunLedger, RunStarted, Trained

    run = RunDir.create(root, resume=False)
    (run.logs_dir / "rank0.log").write_text("ERROR the model did not load\n")
    with RunLedger(run.events_path) as ledger:
        ledger.emit(RunStarted(config_hash="abc"))
        if trained:
            ledger.emit(
                Trained(step=0, group_ids=[], item_keys=[], head_versions=[], staleness=[],
                        policy_version=1)
            )  # fmt: skip
        ledger.emit(RunFinished(reason="error", step=0))


def test_a_start_that_never_trained_leaves_the_folder_reusable(tmp_path: Path) -> None:
    root = tmp_path / "r"
    _failed_start(root)
    assert RunDir(root).never_trained()
    run = RunDir.create(root, resume=False)
    assert not run.events_path.exists()  # the new run starts a fresh ledger
    kept = list(run.failed_starts_dir.iterdir())
    assert len(kept) == 1
    assert (kept[0] / "logs" / "rank0.log").read_text() == "ERROR the model did not load\n"
    assert (kept[0] / "events.jsonl").is_file()
    _failed_start(root)  # fails again: a second record, the first one kept
    RunDir.create(root, resume=False)
    assert len(list(run.failed_starts_dir.iterdir())) == 2


@pytest.mark.parametrize("what", ["trained", "checkpoint", "metrics", "no ledger"])
def test_a_folder_that_holds_a_run_is_still_refused(tmp_path: Path, what: str) -> None:
    root = tmp_path / "r"
    _failed_start(root, trained=what == "trained")
    run = RunDir(root)
    if what == "checkpoint":
        (run.checkpoints_dir / "step_1").mkdir()
    elif what == "metrics":
        run.metrics_path.write_text('{"step":0}\n')
    elif what == "no ledger":
        run.events_path.unlink()
    assert not run.never_trained()
    with pytest.raises(ConfigError, match="already holds a run"):
        RunDir.create(root, resume=False)
    assert not run.failed_starts_dir.exists()
