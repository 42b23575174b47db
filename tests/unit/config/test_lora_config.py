"""``[model.lora]``: defaults, the shipped recipe, and bad values refused with their path."""

from __future__ import annotations

from pathlib import Path

import pytest

from nexrl_async.cli import main
from nexrl_async.config.loader import load_recipe
from nexrl_async.config.model import BuiltModel, LoraConfig

RECIPES = Path(__file__).parents[3] / "recipes" / "reverse_digits"


def test_the_lora_recipe_sets_adapters_on_the_demo_model() -> None:
    base = load_recipe(RECIPES / "recipe.toml").config.model
    model = load_recipe(RECIPES / "lora.toml").config.model
    assert isinstance(model, BuiltModel)
    assert base.lora is None
    assert model.lora == LoraConfig(rank=3, alpha=6.0, target_modules="all-linear")
    assert model.hidden_size == base.hidden_size  # the demo's model, frozen


def test_overrides_reach_lora_fields() -> None:
    cfg = load_recipe(
        RECIPES / "recipe.toml",
        ["model.lora.rank=16", "model.lora.target_modules=['q_proj', 'v_proj']"],
    ).config
    assert cfg.model.lora == LoraConfig(rank=16, target_modules=["q_proj", "v_proj"])


@pytest.mark.parametrize(
    "override",
    [
        "model.lora.rank=0",
        "model.lora.alpha=0",
        "model.lora.dropout=1.0",
        "model.lora.dropout=-0.1",
        'model.lora.target_modules="attention"',
        "model.lora.target_modules=[]",
        "model.lora.target_modules=['']",
        "model.lora.rslora=2",
        "model.lora.nosuchfield=1",
    ],
)
def test_a_bad_lora_value_is_refused_with_its_path(
    override: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as info:
        main(["check", str(RECIPES / "lora.toml"), "--set", override])
    err = capsys.readouterr().err
    assert info.value.code == 2, err
    assert override.split("=")[0] in err, err
    assert "Traceback" not in err


@pytest.mark.parametrize(
    ("targets", "problem"),
    [
        ('["embed_tokens"]', "not a linear layer"),
        ('["lm_head"]', "tied"),
        ('["no_such_layer"]', "not found"),
    ],
)
def test_check_builds_the_adapters_and_refuses_bad_targets(
    targets: str, problem: str, capsys: pytest.CaptureFixture[str]
) -> None:
    override = f"model.lora.target_modules={targets}"
    with pytest.raises(SystemExit) as info:
        main(["check", str(RECIPES / "lora.toml"), "--set", override])
    err = capsys.readouterr().err
    assert info.value.code == 2, err
    assert "model.lora.target_modules" in err, err
    assert problem in err, err
    assert "Traceback" not in err
