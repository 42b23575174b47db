"""``check`` refuses a corpus of bad recipes: exit code 2, the field path, no traceback."""

from __future__ import annotations

from pathlib import Path

import pytest

from nexrl_async.cli import main

RECIPE = Path(__file__).parents[3] / "recipes" / "reverse_digits" / "recipe.toml"

BAD_OVERRIDES = [
    'run.total_steps=0', 'run.total_steps=-3', 'run.total_steps="ten"', 'run.seed=1.5',
    'run.max_wall_s=-1', 'run.name=3', 'model.hidden_size=0', 'model.num_hidden_layers=-1',
    'model.kind="magic"', 'model.dtype="float8"', 'model.num_attention_heads="4"',
    'tokenizer.kind="bpe-magic"', 'tokenizer.alphabet=7', 'data.kind="csv"',
    'data.factory="task.py:nope"', 'data.factory="nofile.py:make"', 'data.factory="bad ref"',
    'data.epochs=0', 'data.max_items=-1', 'data.required="prompt"', 'data.kwargs=3',
    'data.shuffle="yes"', 'rollout.workers=0', 'rollout.workers=100000',
    'rollout.group_size=0', 'rollout.group_size=5000', 'rollout.max_new_tokens=0',
    'rollout.max_turns=0', 'rollout.evaluator="task.py:Nope"', 'rollout.evaluator="nofile.py:E"',
    'rollout.sample_timeout_s=0', 'rollout.sampling.temperature=-1', 'rollout.sampling.top_p=2',
    'rollout.tools=["nofile.py:f"]', 'rollout.worker="task.py:nope"',
    'rollout.apply_chat_template=1', 'pool.batch_groups=0', 'pool.batch_groups=10000000',
    'pool.capacity_groups=0', 'pool.filter_zero_variance="no"', 'staleness.mode="async"',
    'staleness.max_staleness=-1', 'staleness.on_overdue="skip"', 'staleness.max_inflight_groups=0',
    'algorithm.estimator="ppo2"', 'algorithm.loss_agg="mean"', 'algorithm.entropy_coef="x"',
    'algorithm.mode="ppo"', 'algorithm.epochs=0', 'algorithm.minibatches=0', 'optim.lr=-1',
    'optim.weight_decay="none"', 'optim.max_grad_norm=-1', 'optim.schedule="exp"',
    'trainer.device="tpu"', 'trainer.threads=-1', 'trainer.micro_batch_tokens=0',
    'inference.backend="tgi"', 'inference.servers=0', 'inference.max_batch=0',
    'weights.transport="nfs"', 'weights.inflight="pause"', 'validation.every_steps=-1',
    'validation.temperature=-0.5', 'validation.max_items=0', 'checkpoint.every_steps=-1',
    'checkpoint.keep_last=0', 'logging.level="LOUD"', 'logging.samples_every_steps=-1',
    'faults.window_groups=0', 'faults.stop_failed_fraction=1.5', 'nosuchsection.x=1',
    'run.nosuchfield=1', 'algorithm.dpo.beta=0', 'algorithm.dpo.loss="hinge"',
    'algorithm.dpo.label_smoothing=0.5', 'algorithm.dpo.reference="server"',
    'algorithm.loss="task.py:nope"', 'algorithm.loss="bad ref"', 'validation.worker="task.py:nope"',
]  # fmt: skip


def check(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    with pytest.raises(SystemExit) as info:
        main(["check", *argv])
    code = info.value.code
    return (code if isinstance(code, int) else 1), capsys.readouterr().err


@pytest.mark.parametrize("override", BAD_OVERRIDES)
def test_a_bad_value_is_refused_with_its_field_path(
    override: str, capsys: pytest.CaptureFixture[str]
) -> None:
    code, err = check([str(RECIPE), "--set", override], capsys)
    assert code == 2, err
    assert override.split("=")[0] in err, err
    assert "Traceback" not in err


@pytest.mark.parametrize(
    ("module", "expected"),
    [
        ("import sys\nsys.exit(3)\n", "raised SystemExit: 3"),
        ("raise KeyboardInterrupt\n", "raised KeyboardInterrupt"),
        ("def broken(:\n", "raised SyntaxError"),
    ],
)
def test_user_code_that_ends_the_process_at_import_is_a_recipe_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], module: str, expected: str
) -> None:
    (tmp_path / "ev.py").write_text(module)
    recipe = tmp_path / "r.toml"
    recipe.write_text(f'extends = "{RECIPE}"\n[rollout]\nevaluator = "ev.py:Evaluator"\n')
    code, err = check([str(recipe)], capsys)
    assert code == 2, err
    assert "rollout.evaluator" in err
    assert expected in err


def test_a_binary_file_is_not_a_recipe(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    recipe = tmp_path / "r.toml"
    recipe.write_bytes(bytes(range(128, 256)))
    code, err = check([str(recipe)], capsys)
    assert code == 2, err
    assert "not a text file" in err
