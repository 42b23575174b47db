from __future__ import annotations

from pathlib import Path

import pytest

BASE = """
[model]
kind = "build"

[tokenizer]
kind = "chars"

[data]
kind = "jsonl"
path = "train.jsonl"

[rollout]
evaluator = "evaluator.py:Evaluator"
"""


@pytest.fixture
def recipe_dir(tmp_path: Path) -> Path:
    (tmp_path / "train.jsonl").write_text('{"prompt": "12"}\n')
    (tmp_path / "evaluator.py").write_text(
        "class Evaluator:\n"
        "    def evaluate(self, item, trajectory):\n"
        "        raise NotImplementedError\n"
    )
    (tmp_path / "base.toml").write_text(BASE)
    return tmp_path


@pytest.fixture
def write(recipe_dir: Path):
    def _write(text: str, name: str = "recipe.toml") -> Path:
        path = recipe_dir / name
        path.write_text(text)
        return path

    return _write
