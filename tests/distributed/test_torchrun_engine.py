"""``torchrun -m nexrl_async run``: rank 0 runs the engine, every rank trains."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from nexrl_async.obs.ledger import RunFinished, Trained, read_events

pytestmark = [pytest.mark.distributed, pytest.mark.slow, pytest.mark.timeout(300)]

RECIPE = Path(__file__).parents[2] / "recipes" / "reverse_digits" / "recipe.toml"
SMALL = [
    "run.total_steps=3",
    "rollout.workers=4",
    "rollout.group_size=4",
    "pool.batch_groups=4",
    "logging.progress=false",
    "validation.every_steps=0",
    "validation.before_training=false",
    "validation.at_end=false",
]


@pytest.mark.parametrize("nproc", [1, 2])
def test_torchrun_run_completes(tmp_path: Path, nproc: int) -> None:
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent))
    assert torchrun is not None
    out = tmp_path / "run"
    sets = [arg for item in SMALL for arg in ("--set", item)]
    proc = subprocess.run(
        [torchrun, "--standalone", f"--nproc-per-node={nproc}", "-m", "nexrl_async", "run",
         str(RECIPE), "--output", str(out), *sets],
        capture_output=True, text=True, timeout=280, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    events = read_events(out / "events.jsonl")
    assert [e.step for e in events if isinstance(e, Trained)] == [0, 1, 2]
    assert isinstance(events[-1], RunFinished)
    assert events[-1].reason == "completed"
    assert (out / "final" / "config.json").is_file()
