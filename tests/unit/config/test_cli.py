"""The CLI's contract: one line per error, exit 2 for config errors, never a traceback."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from nexrl_async.cli import main


def run_cli(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as info:
        main(args)
    out, err = capsys.readouterr()
    code = info.value.code
    return (code if isinstance(code, int) else 1), out, err


def test_check_prints_summary_and_exits_0(write, capsys) -> None:
    code, out, _ = run_cli(["check", str(write('extends = "base.toml"\n'))], capsys)
    assert code == 0
    assert "evaluator" in out
    assert out.strip().endswith("ok")


@pytest.mark.parametrize(
    ("text", "args", "needle"),
    [
        ('extends = "base.toml"\n[bogus]\n', [], "unknown section [bogus]"),
        ('extends = "base.toml"\n[rollout]\nworkerz = 2\n', [], "unknown key rollout.workerz"),
        ('extends = "base.toml"\n[rollout]\nworkers = "x"\n', [], "rollout.workers"),
        ('extends = "base.toml"\n[rollout]\nworkers = 0\n', [], "rollout.workers = 0"),
        ('extends = "nope.toml"\n', [], "nope.toml: recipe file not found"),
        ('extends = "recipe.toml"\n', [], "cyclic chain"),
        ("this is = = not toml", [], "not valid TOML"),
        ('extends = "base.toml"\n', ["--set", "pool.nope=1"], "--set pool.nope: unknown key"),
    ],
)
def test_bad_recipes_exit_2_with_one_line(write, capsys, text: str, args: list[str], needle: str):
    code, _, err = run_cli(["check", str(write(text)), *args], capsys)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert needle in lines[0]
    assert "Traceback" not in err


def test_missing_user_code_fails_check(write, capsys) -> None:
    path = write('extends = "base.toml"\n[rollout]\nevaluator = "nowhere.py:Eval"\n')
    code, _, err = run_cli(["check", str(path)], capsys)
    assert code == 2
    assert "rollout.evaluator" in err
    assert "nowhere.py" in err


def test_missing_name_in_user_code_fails_check(write, capsys) -> None:
    path = write('extends = "base.toml"\n[rollout]\nevaluator = "evaluator.py:Missing"\n')
    code, _, err = run_cli(["check", str(path)], capsys)
    assert code == 2
    assert "has no attribute 'Missing'" in err


def test_missing_data_file_fails_check(write, recipe_dir: Path, capsys) -> None:
    (recipe_dir / "train.jsonl").unlink()
    code, _, err = run_cli(["check", str(write('extends = "base.toml"\n'))], capsys)
    assert code == 2
    assert "data.path" in err


def test_entry_point_in_a_real_process(write) -> None:
    path = write('extends = "base.toml"\n[rollout]\nworkers = -3\n')
    proc = subprocess.run(
        [sys.executable, "-m", "nexrl_async", "check", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"error: {path}: rollout.workers = -3: expected int >= 1"


def test_version(capsys) -> None:
    code, out, _ = run_cli(["--version"], capsys)
    assert code == 0
    assert out.startswith("nexrl-async ")
