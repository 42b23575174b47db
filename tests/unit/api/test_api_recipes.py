"""Recipes from Python: objects become references, overrides mean ``--set``."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest

from nexrl_async.api.objects import MODULE_PREFIX, Registration, Rows, replace_objects
from nexrl_async.api.recipes import load_any
from nexrl_async.config.data import JsonlData, PythonData
from nexrl_async.config.loader import load_recipe
from nexrl_async.core.errors import ConfigError
from nexrl_async.core.usercode import load_object

RECIPE = Path(__file__).parents[3] / "recipes" / "reverse_digits" / "recipe.toml"
ROWS = [{"prompt": "<bos>12<sep>", "answer": "21"}, {"prompt": "<bos>34<sep>", "answer": "43"}]


def score(item: Any, trajectory: Any) -> float:
    return 1.0


class Agent:
    """Stands for a custom worker class."""


@pytest.fixture
def reg() -> Any:
    registration = Registration()
    yield registration
    registration.release()


def test_a_closure_is_registered_for_the_run_and_released(reg: Registration) -> None:
    def evaluate(item: Any, trajectory: Any) -> float:
        return 0.5

    ref = reg.ref(evaluate, "rollout.evaluator")
    module = ref.partition(":")[0]
    assert module.startswith(MODULE_PREFIX)
    assert ref.endswith(":evaluate")
    assert load_object(ref, Path.cwd()) is evaluate
    assert reg.ref(evaluate, "rollout.evaluator") == ref  # the same object, the same name
    reg.release()
    assert module not in sys.modules


def test_names_are_stable_across_runs_and_distinct_for_live_objects() -> None:
    def make() -> Any:
        return lambda item, trajectory: 1.0

    first, second = Registration(), Registration()
    a, b = make(), make()  # same module and qualname, different objects
    ref_a = first.ref(a, "rollout.evaluator")
    ref_b = second.ref(b, "rollout.evaluator")
    assert ref_a != ref_b  # both live: each run loads its own
    assert load_object(ref_a, Path.cwd()) is a
    assert load_object(ref_b, Path.cwd()) is b
    first.release()
    second.release()
    again = Registration()
    assert again.ref(make(), "rollout.evaluator") == ref_a  # a rerun names it as before
    again.release()


def test_importable_functions_keep_their_own_reference(reg: Registration) -> None:
    assert reg.ref(json.dumps, "rollout.tools.0") == "json:dumps"
    assert reg.modules == []


def test_rows_become_a_factory(reg: Registration) -> None:
    ref = reg.ref(ROWS, "data.factory")
    factory = load_object(ref, Path.cwd())
    assert isinstance(factory, Rows)
    produced = factory(count=3)
    assert produced == ROWS
    produced[0]["prompt"] = "changed"
    assert factory()[0]["prompt"] == "<bos>12<sep>"  # every call hands out fresh rows
    other = Registration()
    assert other.ref([dict(r) for r in ROWS], "data.factory") != ref  # both live
    other.release()


def test_replace_objects_walks_the_schema(reg: Registration) -> None:
    raw = {
        "rollout": {"evaluator": score, "tools": ["tools.py:search", json.loads], "worker": Agent},
        "data": ROWS,
        "validation": {"data": {"kind": "python", "factory": lambda: ROWS}},
        "run": {"name": "x"},
    }
    out = replace_objects(raw, reg)
    assert out["rollout"]["tools"][0] == "tools.py:search"
    assert out["rollout"]["tools"][1] == "json:loads"
    assert load_object(out["rollout"]["worker"], Path.cwd()) is Agent
    assert isinstance(out["rollout"]["evaluator"], str)
    assert load_object(out["rollout"]["evaluator"], Path.cwd()) is score
    assert out["data"]["kind"] == "python"
    assert load_object(out["data"]["factory"], Path.cwd())() == ROWS
    assert load_object(out["validation"]["data"]["factory"], Path.cwd())() == ROWS
    assert out["run"] == {"name": "x"}
    assert raw["data"] is ROWS  # the input is not changed


def test_a_mapping_recipe_with_objects_and_overrides(reg: Registration, tmp_path: Path) -> None:
    loaded = load_any(
        {"extends": str(RECIPE), "rollout": {"evaluator": score}},
        {"run.total_steps": 7, "data": ROWS, "validation.data.max_items": 2},
        registration=reg,
        base_dir=tmp_path,
    )
    cfg = loaded.config
    assert cfg.run.total_steps == 7
    assert cfg.rollout.group_size == 8  # from the extended file
    assert load_object(cfg.rollout.evaluator, loaded.base_dir) is score
    assert isinstance(cfg.data, PythonData)
    assert load_object(cfg.data.factory, loaded.base_dir)() == ROWS
    assert loaded.base_dir == tmp_path.resolve()
    assert "run.total_steps=7" in loaded.overrides


def test_mapping_overrides_mean_what_set_means(reg: Registration) -> None:
    ours = load_any(RECIPE, {"run.total_steps": 30, "pool.batch_groups": 4}, registration=reg)
    theirs = load_recipe(RECIPE, ["run.total_steps=30", "pool.batch_groups=4"])
    assert ours.config == theirs.config
    as_strings = load_any(RECIPE, ["run.total_steps=30", "pool.batch_groups=4"], registration=reg)
    assert as_strings.config == theirs.config


def test_a_struct_recipe_round_trips(reg: Registration, tmp_path: Path) -> None:
    (tmp_path / "train.jsonl").write_text('{"prompt": "1"}\n')
    base = load_recipe(RECIPE).config
    import msgspec

    cfg = msgspec.structs.replace(base, data=JsonlData(path=str(tmp_path / "train.jsonl")))
    loaded = load_any(cfg, {"run.total_steps": 3}, registration=reg, base_dir=tmp_path)
    assert loaded.config.data == cfg.data
    assert loaded.config.run.total_steps == 3
    assert loaded.config.rollout == base.rollout
    rollout = msgspec.structs.replace(base.rollout, evaluator=score)  # an object in a struct
    with_object = load_any(
        msgspec.structs.replace(base, rollout=rollout), None, registration=reg, base_dir=tmp_path
    )
    assert load_object(with_object.config.rollout.evaluator, tmp_path) is score


def test_bad_overrides_name_the_path(reg: Registration) -> None:
    with pytest.raises(ConfigError, match="unknown key 'nope'") as info:
        load_any(RECIPE, {"pool.nope": 1}, registration=reg)
    assert info.value.path == "pool.nope"
    with pytest.raises(ConfigError, match=r"rollout\.workers = 0"):
        load_any(RECIPE, {"rollout.workers": 0}, registration=reg)
    with pytest.raises(ConfigError, match="expected a path, a mapping or a RecipeConfig"):
        load_any(42, None, registration=reg)  # type: ignore[arg-type]


def test_a_mixture_holds_objects_in_each_source(reg: Registration, tmp_path: Path) -> None:
    mixture = {
        "kind": "mixture",
        "sources": [
            {"name": "easy", "kind": "python", "factory": ROWS, "weight": 3.0},
            {"name": "hard", "kind": "python", "factory": lambda: ROWS, "evaluator": score},
        ],
    }
    loaded = load_any(
        {"extends": str(RECIPE), "data": mixture}, None, registration=reg, base_dir=tmp_path
    )
    easy, hard = loaded.config.data.sources  # type: ignore[union-attr]
    assert load_object(easy.factory, tmp_path)() == ROWS
    assert load_object(hard.factory, tmp_path)() == ROWS
    assert load_object(hard.evaluator, tmp_path) is score


def test_a_script_run_again_can_resume_its_run(tmp_path: Path) -> None:
    from nexrl_async.engine.resume import check_resumable

    def reward(item: Any, trajectory: Any) -> float:
        return 1.0

    def recipe() -> dict[str, Any]:  # what the script builds, each time it runs
        return {"extends": str(RECIPE), "rollout": {"evaluator": reward}, "data": list(ROWS)}

    first, second = Registration(), Registration()
    before = load_any(recipe(), None, registration=first, base_dir=tmp_path)
    first.release()  # the first process ended
    after = load_any(recipe(), {"run.total_steps": 500}, registration=second, base_dir=tmp_path)
    second.release()
    check_resumable(before.config, after.config)  # data and the rest resume-bound: unchanged
    third = Registration()
    changed = load_any(
        {**recipe(), "data": [*ROWS, {"prompt": "<bos>56<sep>", "answer": "65"}]},
        None, registration=third, base_dir=tmp_path,
    )  # fmt: skip
    third.release()
    with pytest.raises(ConfigError, match="data"):
        check_resumable(before.config, changed.config)
