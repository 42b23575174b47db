"""The run's pre-flight: ``check`` and ``run`` refuse the same recipes, with the same line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from nexrl_async.cli import main
from nexrl_async.config.loader import load_recipe
from nexrl_async.core.errors import ConfigError
from nexrl_async.engine.startup import preflight_run

BASE = """
[model]
kind = "build"
hidden_size = 16
intermediate_size = 32
num_hidden_layers = 1
num_attention_heads = 2

[tokenizer]
kind = "chars"
alphabet = "0123456789"

[data]
kind = "jsonl"
path = "train.jsonl"

[rollout]
evaluator = "evaluator.py:Evaluator"
"""

EVALUATORS = """
from nexrl_async.rollout.worker import RolloutWorker

class Evaluator:
    def evaluate(self, item, trajectory):
        return 1.0

class NeedsThree:
    def evaluate(self, item, trajectory, extra):
        return 1.0

class Broken:
    def __init__(self):
        raise RuntimeError("no judge configured")

def prepare(batch):
    return None

def prepare_nothing():
    return None

class NotAWorker:
    pass

NOT_CALLABLE = 3

class NeedsKey(RolloutWorker):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        raise KeyError("JUDGE_API_KEY")
"""


@pytest.fixture
def recipe(tmp_path: Path) -> Path:
    (tmp_path / "train.jsonl").write_text('{"prompt": "12", "answer": "21"}\n')
    (tmp_path / "evaluator.py").write_text(EVALUATORS)
    path = tmp_path / "recipe.toml"
    path.write_text(BASE)
    return path


def refused(recipe: Path, *overrides: str) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        preflight_run(load_recipe(recipe, list(overrides)))
    assert info.value.file == str(recipe)
    return info.value


def test_a_good_recipe_passes(recipe: Path) -> None:
    preflight_run(load_recipe(recipe))


@pytest.mark.parametrize(
    ("override", "path", "needle"),
    [
        ("logging.tensorboard=true", "logging.tensorboard", "'tensorboard' is not installed"),
        ("logging.wandb.enabled=true", "logging.wandb.enabled", "'wandb' is not installed"),
        (
            'model.attn_implementation="flash_attention_2"',
            "model.attn_implementation",
            "flash-attn is not installed",
        ),
        (
            'rollout.evaluator="evaluator.py:NeedsThree"',
            "rollout.evaluator",
            "cannot be called with 2 positional arguments",
        ),
        ('rollout.evaluator="evaluator.py:Broken"', "rollout.evaluator", "no judge configured"),
        ('rollout.worker="evaluator.py:NotAWorker"', "rollout.worker", "must subclass"),
        (
            'rollout.worker="evaluator.py:NeedsKey"',
            "rollout.worker",
            "building the worker raised KeyError: 'JUDGE_API_KEY'",
        ),
        ('rollout.tools=["evaluator.py:NOT_CALLABLE"]', "rollout.tools", "is not callable"),
        (
            'algorithm.prepare_batch="evaluator.py:prepare_nothing"',
            "algorithm.prepare_batch",
            "cannot be called with 1 positional argument",
        ),
        (
            'algorithm.loss="evaluator.py:prepare_nothing"',
            "algorithm.loss",
            "cannot be called with 1 positional argument",
        ),
        ('algorithm.loss="evaluator.py:NOT_CALLABLE"', "algorithm.loss", "is not callable"),
        ('rollout.prompt_field="question"', "data", "no row has every field"),
        (
            'pool.group_by=["task_id"]',
            "data",
            "no row has every field the run needs (prompt, task_id)",
        ),
        ('data.required=["solution"]', "data", "'solution' has a value in no row"),
    ],
)
def test_what_the_run_would_reject_is_refused(
    recipe: Path, override: str, path: str, needle: str
) -> None:
    err = refused(recipe, override)
    assert err.path == path
    assert needle in str(err)


def test_a_good_prepare_batch_passes(recipe: Path) -> None:
    preflight_run(load_recipe(recipe, ['algorithm.prepare_batch="evaluator.py:prepare"']))


def test_a_pretrained_folder_without_weights_is_refused(recipe: Path, tmp_path: Path) -> None:
    model = tmp_path / "model"
    model.mkdir()
    config = {"model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"], "hidden_size": 16,
              "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
              "num_key_value_heads": 2, "vocab_size": 32}  # fmt: skip
    (model / "config.json").write_text(json.dumps(config))
    err = refused(recipe, 'model.kind="pretrained"', f'model.path="{model}"')
    assert err.path == "model.path"
    assert "no weight files" in str(err)


def test_lora_targets_are_checked_on_a_pretrained_model(recipe: Path, tmp_path: Path) -> None:
    model = tmp_path / "model"
    model.mkdir()
    config = {"model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"], "hidden_size": 16,
              "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
              "num_key_value_heads": 2, "vocab_size": 32}  # fmt: skip
    (model / "config.json").write_text(json.dumps(config))
    (model / "model.safetensors").write_bytes(b"")  # present; the pre-flight reads no weights
    pretrained = ['model.kind="pretrained"', f'model.path="{model}"']
    preflight_run(load_recipe(recipe, [*pretrained, 'model.lora.target_modules=["q_proj"]']))
    err = refused(recipe, *pretrained, 'model.lora.target_modules=["no_such_proj"]')
    assert err.path == "model.lora.target_modules"


def test_an_unknown_architecture_is_refused(recipe: Path, tmp_path: Path) -> None:
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"model_type": "no-such-model"}))
    err = refused(recipe, 'model.kind="pretrained"', f'model.path="{model}"')
    assert err.path == "model.path"
    assert "cannot load the model" in str(err)


def test_check_and_run_refuse_alike_and_run_leaves_no_folder(
    recipe: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    lines = []
    for command in (["check"], ["run", "--output", str(out)]):
        with pytest.raises(SystemExit) as info:
            main([*command, str(recipe), "--set", "logging.tensorboard=true"])
        assert info.value.code == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1, err
        lines.append(err[0])
    assert lines[0] == lines[1]
    assert "logging.tensorboard" in lines[0]
    assert not out.exists()  # refused before the run folder was made
