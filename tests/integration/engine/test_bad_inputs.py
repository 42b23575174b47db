"""Bad rows, a crashing evaluator, NaN rewards and rejected prompts fail samples, not the run."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from nexrl_async.cli import main
from nexrl_async.core.records import FailureReason, Status
from nexrl_async.obs.ledger import Scored, Trained, read_events
from nexrl_async.obs.metrics import read_metrics

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]

RECIPE = Path(__file__).parent / "bad_inputs" / "recipe.toml"


def test_each_bad_sample_is_failed_with_its_reason_and_the_run_goes_on(run_small) -> None:
    run = run_small("run.total_steps=4", recipe=RECIPE)
    events = read_events(run / "events.jsonl")
    reasons = Counter(
        e.failure for e in events if isinstance(e, Scored) and e.status is Status.FAILED
    )
    for reason in (
        FailureReason.BAD_ITEM,
        FailureReason.EVALUATOR_ERROR,
        FailureReason.INVALID_REWARD,
        FailureReason.PROMPT_REJECTED,
    ):
        assert reasons[reason] > 0, reasons
    assert len([e for e in events if isinstance(e, Trained)]) == 4
    rows = read_metrics(run / "metrics.jsonl")
    assert sum(row["rollout/failed"] for row in rows) > 0
    assert any(key.startswith("rollout/failed/") for key in rows[-1])


def test_missing_user_code_fails_check_and_run(tmp_path: Path, capsys) -> None:
    recipe = tmp_path / "r.toml"
    recipe.write_text(f'extends = "{RECIPE}"\n[rollout]\nevaluator = "task.py:NoSuchEvaluator"\n')
    for command in ("check", "run"):
        with pytest.raises(SystemExit) as info:
            main([command, str(recipe), "--set", "logging.progress=false"])
        assert info.value.code == 2
        err = capsys.readouterr().err
        assert "rollout.evaluator" in err
        assert "NoSuchEvaluator" in err
