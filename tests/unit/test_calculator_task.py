"""The calculator recipe's task (``recipes/calculator/task.py``): problems that need one or two
tool calls, demonstrations that make exactly those calls, and a tool that does one operation.

The demonstrations are what stage one trains on, so a wrong intermediate result or a call the
tool rejects would teach the model a broken conversation; every one is checked here, and every
conversation fits the recipe's context.
"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path
from types import ModuleType

import anyio
import pytest

from nexrl_async.config.loader import load_recipe
from nexrl_async.config.model import BuiltModel, CharTokenizer
from nexrl_async.train.build import build_char_tokenizer

RECIPES = Path(__file__).parents[2] / "recipes" / "calculator"
CALL = re.compile(r'<tool_call>\{"name":"calc","arguments":\{"expr":"([^"]*)"\}\}</tool_call>')


@pytest.fixture(scope="module")
def task() -> ModuleType:
    spec = importlib.util.spec_from_file_location("calculator_task", RECIPES / "task.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_tool_does_one_operation(task: ModuleType) -> None:
    assert anyio.run(task.calc, "423*456") == "192888"
    assert anyio.run(task.calc, " 192888+789 ") == "193677"
    with pytest.raises(ValueError, match="expected a\\+b or a\\*b"):
        anyio.run(task.calc, "423*456+789")  # two operations: two calls


def test_items_mix_one_and_two_step_problems_with_six_digit_answers(task: ModuleType) -> None:
    items = list(task.make_items(count=2000, seed=3))
    two_step = [i for i in items if "+" in i["prompt"]]
    assert 0.45 < len(two_step) / len(items) < 0.55
    for item in items:
        assert len(item["answer"]) == 6
        assert str(eval(item["prompt"])) == item["answer"]
    assert not any("+" in i["prompt"] for i in task.make_items(count=200, two_step_share=0.0))


def test_demonstrations_call_the_tool_once_per_operation(task: ModuleType) -> None:
    demos = list(task.make_demos(count=1000, seed=5, tool_share=0.4))
    with_tool = 0
    for demo in demos:
        messages = demo["messages"]
        problem, answer = messages[0]["content"], messages[-1]["content"]
        assert answer == f"={eval(problem)}"
        calls = [CALL.fullmatch(m["content"]) for m in messages if m["role"] == "assistant"][:-1]
        results = [m["content"] for m in messages if m["role"] == "tool"]
        assert len(calls) == len(results)
        if calls:
            with_tool += 1
            assert len(calls) == problem.count("+") + 1
            for match, result in zip(calls, results, strict=True):
                assert match is not None
                assert anyio.run(task.calc, match[1]) == result
            assert answer == f"={results[-1]}"  # the answer copies the last result
    assert 0.35 < with_tool / len(demos) < 0.45


def test_every_conversation_fits_the_model(task: ModuleType) -> None:
    recipe = load_recipe(RECIPES / "sft.toml").config
    assert isinstance(recipe.tokenizer, CharTokenizer)
    assert isinstance(recipe.model, BuiltModel)
    tok = build_char_tokenizer(recipe.tokenizer)
    longest = max(
        len(tok(tok.apply_chat_template(d["messages"], tokenize=False))["input_ids"])
        for d in task.make_demos(count=300, seed=7, tool_share=1.0)
    )
    assert longest <= recipe.model.max_position_embeddings
