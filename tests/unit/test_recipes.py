"""Every shipped recipe passes ``nexrl-async check``.

A recipe that reads an earlier stage's output (``STAGE_INPUTS``: the calculator's RL stage reads
the SFT stage's exported model) is checked with that path pointed at a model folder built like
the earlier stage's; that it is missing until the first stage ran is checked too.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from nexrl_async.cli import main
from nexrl_async.config.loader import load_recipe
from nexrl_async.config.model import BuiltModel, CharTokenizer
from nexrl_async.train.build import build_char_tokenizer, build_model_for, save_model_dir

VLLM_MISSING = 'inference.backend = "vllm": vllm is not installed for inference.python'
ROOT = Path(__file__).parents[2] / "recipes"
RECIPES = sorted(ROOT.rglob("*.toml"))
STAGE_INPUTS = {"calculator/rl.toml": ("model.path", "calculator/sft.toml")}
"""Recipe -> (the field that names an earlier stage's output, the earlier stage's recipe)."""


def _name(recipe: Path) -> str:
    return str(recipe.relative_to(recipe.parents[1]))


def _built_by(recipe: Path, folder: Path) -> Path:
    """The untrained model and tokenizer ``recipe`` builds, saved to ``folder``."""
    cfg = load_recipe(recipe).config
    assert isinstance(cfg.model, BuiltModel)
    assert isinstance(cfg.tokenizer, CharTokenizer)
    tok = build_char_tokenizer(cfg.tokenizer)
    model = build_model_for(cfg.model, tok, seed=0)  # fmt: skip
    return save_model_dir(model, tok, folder)


def test_recipes_exist() -> None:
    assert RECIPES, "no recipes shipped"


@pytest.mark.parametrize("recipe", RECIPES, ids=_name)
def test_recipe_passes_check(
    recipe: Path, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    extra: list[str] = []
    if _name(recipe) in STAGE_INPUTS:
        field, earlier = STAGE_INPUTS[_name(recipe)]
        extra = ["--set", f"{field}='{_built_by(ROOT / earlier, tmp_path / 'final')}'"]
    with pytest.raises(SystemExit) as info:
        main(["check", str(recipe), *extra])
    err = capsys.readouterr().err
    if info.value.code == 2 and VLLM_MISSING in err and "NEXRL_VLLM_PYTHON" not in os.environ:
        pytest.skip("no vLLM environment here (nox -s vllm_env): check refuses it, as run would")
    assert info.value.code == 0, err


@pytest.mark.parametrize("name", sorted(STAGE_INPUTS))
def test_a_missing_earlier_stage_is_named(
    name: str,
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.chdir(tmp_path)  # the earlier stage's output is read under the working dir
    with pytest.raises(SystemExit) as info:
        main(["check", str(ROOT / name)])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert STAGE_INPUTS[name][0] in err
    assert str(tmp_path) in err
