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
