"""``rollout.sandbox``: a recipe offering the sandboxed python tool without isolation is refused."""

from __future__ import annotations

from pathlib import Path

import pytest

from nexrl_async.cli import main
from nexrl_async.config.loader import load_recipe
from nexrl_async.core.errors import ConfigError
from nexrl_async.rollout import sandbox

RECIPE = Path(__file__).parents[3] / "recipes" / "reverse_digits" / "recipe.toml"
OFFER = f'rollout.tools=["{sandbox.PYTHON_TOOL}"]'


@pytest.fixture
def no_bwrap(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sandbox, "isolation_problem", lambda: "bwrap (bubblewrap) is not installed")
    monkeypatch.setitem(sandbox._TOOL_ISOLATION, "python", None)


@pytest.mark.usefixtures("no_bwrap")
def test_namespaces_without_bubblewrap_is_refused_at_the_field() -> None:
    cfg = load_recipe(RECIPE, [OFFER]).config
    with pytest.raises(ConfigError, match="bubblewrap") as info:
        sandbox.configure_tool(cfg.rollout)
    assert info.value.path == "rollout.sandbox"


@pytest.mark.usefixtures("no_bwrap")
def test_opting_into_resource_limits_only_is_accepted_and_applied() -> None:
    cfg = load_recipe(RECIPE, [OFFER, 'rollout.sandbox="rlimits"']).config
    sandbox.configure_tool(cfg.rollout)
    assert sandbox._TOOL_ISOLATION["python"] == "rlimits"


@pytest.mark.usefixtures("no_bwrap")
def test_check_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["check", str(RECIPE), "--set", OFFER])
    assert info.value.code == 2
    assert "rollout.sandbox" in capsys.readouterr().err


def test_recipes_without_the_tool_never_probe(monkeypatch: pytest.MonkeyPatch) -> None:
    def probe() -> str:
        raise AssertionError("probed")

    monkeypatch.setattr(sandbox, "isolation_problem", probe)
    sandbox.configure_tool(load_recipe(RECIPE).config.rollout)
