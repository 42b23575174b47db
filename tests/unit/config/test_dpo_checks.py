"""Recipe checks of ``algorithm.mode = "dpo"``: one optimizer step per batch, serverless runs."""

from __future__ import annotations

from pathlib import Path

import pytest

from nexrl_async.cli import main

DPO = Path(__file__).parents[3] / "recipes" / "reverse_digits" / "dpo.toml"
PREFERENCE_WORKER = '"nexrl_async.rollout.preference_worker:PreferenceWorker"'


def check(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    with pytest.raises(SystemExit) as info:
        main(["check", str(DPO), *argv])
    code = info.value.code
    return (code if isinstance(code, int) else 1), capsys.readouterr().err


@pytest.mark.parametrize(
    ("override", "field", "says"),
    [
        ("algorithm.minibatches=2", "algorithm.minibatches", "one optimizer step per batch"),
        ("algorithm.epochs=3", "algorithm.epochs", "one optimizer step per batch"),
        ("algorithm.dynamic_sampling=true", "algorithm.dynamic_sampling", "no reward variance"),
        ("pool.min_group_size=1", "pool.min_group_size", "a DPO group is a pair"),
    ],
)
def test_dpo_refuses(
    override: str, field: str, says: str, capsys: pytest.CaptureFixture[str]
) -> None:
    code, err = check(["--set", override], capsys)
    assert code == 2, err
    assert field in err, err
    assert says in err, err


def test_label_smoothing_is_for_the_sigmoid_loss(capsys: pytest.CaptureFixture[str]) -> None:
    code, err = check(
        ["--set", 'algorithm.dpo.loss="ipo"', "--set", "algorithm.dpo.label_smoothing=0.1"], capsys
    )
    assert code == 2, err
    assert "algorithm.dpo.label_smoothing" in err, err
    code, err = check(["--set", "algorithm.dpo.label_smoothing=0.1"], capsys)
    assert code == 0, err


def test_dpo_runs_without_servers_but_rl_does_not(capsys: pytest.CaptureFixture[str]) -> None:
    serverless = [
        "--set",
        'inference.backend="none"',
        "--set",
        f"validation.worker={PREFERENCE_WORKER}",
    ]
    code, err = check(serverless, capsys)
    assert code == 0, err
    rl = ["--set", 'algorithm.mode="rl"', "--set", "rollout.group_size=2"]
    code, err = check([*serverless, *rl], capsys)
    assert code == 2, err
    assert 'only algorithm.mode = "sft" or "dpo"' in err, err
