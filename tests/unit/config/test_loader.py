from __future__ import annotations

from pathlib import Path

import msgspec
import pytest

from nexrl_async.config.data import JsonlData
from nexrl_async.config.inference import AttachInference
from nexrl_async.config.loader import dump_recipe, load_recipe
from nexrl_async.config.model import BuiltModel, PretrainedModel
from nexrl_async.core.errors import ConfigError


def test_small_recipe_gets_defaults(write, recipe_dir: Path) -> None:
    loaded = load_recipe(write('extends = "base.toml"\n'))
    cfg = loaded.config
    assert isinstance(cfg.model, BuiltModel)
    assert cfg.staleness.mode == "batch-async"
    assert cfg.staleness.k == 1
    assert loaded.files == [recipe_dir / "base.toml", recipe_dir / "recipe.toml"]


def test_relative_paths_resolve_against_the_file_that_sets_them(write, recipe_dir: Path) -> None:
    sub = recipe_dir / "sub"
    sub.mkdir()
    (sub / "child.toml").write_text('extends = "../base.toml"\n[rollout]\ntools = ["t.py:f"]\n')
    cfg = load_recipe(sub / "child.toml").config
    assert isinstance(cfg.data, JsonlData)
    assert cfg.data.path == str(recipe_dir / "train.jsonl")
    assert cfg.rollout.evaluator == f"{recipe_dir / 'evaluator.py'}:Evaluator"
    assert cfg.rollout.tools == [f"{sub / 't.py'}:f"]


def test_cwd_paths_resolve_against_the_working_directory(
    write, recipe_dir: Path, tmp_path_factory: pytest.TempPathFactory, monkeypatch
) -> None:
    elsewhere = tmp_path_factory.mktemp("cwd")
    monkeypatch.chdir(elsewhere)
    path = write('extends = "base.toml"\n[model]\nkind = "pretrained"\npath = "{cwd}/runs/a"\n')
    model = load_recipe(path).config.model
    assert isinstance(model, PretrainedModel)
    assert model.path == str(elsewhere / "runs" / "a")


def test_check_transcript_needs_the_chat_template(write) -> None:
    path = write(
        'extends = "base.toml"\n[rollout]\ncheck_transcript = true\napply_chat_template = false\n'
    )
    with pytest.raises(ConfigError, match=r"rollout\.check_transcript"):
        load_recipe(path)


def test_module_refs_are_left_alone(write) -> None:
    path = write('extends = "base.toml"\n[rollout]\nevaluator = "pkg.mod:Thing"\n')
    assert load_recipe(path).config.rollout.evaluator == "pkg.mod:Thing"


def test_extends_deep_merges_tables(write) -> None:
    path = write('extends = "base.toml"\n[model]\nhidden_size = 32\nnum_attention_heads = 2\n')
    model = load_recipe(path).config.model
    assert isinstance(model, BuiltModel)
    assert (model.hidden_size, model.num_attention_heads, model.num_hidden_layers) == (32, 2, 2)


def test_switching_variant_drops_the_old_variants_keys(write) -> None:
    path = write('extends = "base.toml"\n[data]\nkind = "python"\nfactory = "f.py:rows"\n')
    cfg = load_recipe(path).config
    assert cfg.data.factory.endswith("f.py:rows")  # type: ignore[union-attr]


def test_overrides_are_toml_literals_and_bare_strings(write) -> None:
    path = write('extends = "base.toml"\n')
    cfg = load_recipe(
        path, ["rollout.workers=3", "run.name=demo", "rollout.sampling.stop=['x', 'y']"]
    ).config
    assert cfg.rollout.workers == 3
    assert cfg.run.name == "demo"
    assert cfg.rollout.sampling.stop == ["x", "y"]


def test_override_can_switch_a_variant(write) -> None:
    path = write('extends = "base.toml"\n')
    cfg = load_recipe(path, ['inference.backend="attach"', 'inference.urls=["http://h:1"]']).config
    assert cfg.inference.urls == ["http://h:1"]  # type: ignore[union-attr]


def test_override_switching_a_variant_drops_the_old_variants_keys(write) -> None:
    path = write('extends = "base.toml"\n[inference]\nservers = 2\nmax_batch = 8\n')
    cfg = load_recipe(path, ['inference.backend="attach"', 'inference.urls=["http://h:1"]']).config
    assert isinstance(cfg.inference, AttachInference)
    assert cfg.inference.urls == ["http://h:1"]


def test_override_into_free_form_dict(write) -> None:
    cfg = load_recipe(write('extends = "base.toml"\n'), ['data.fields.prompt="question"']).config
    assert cfg.data.fields == {"prompt": "question"}


def test_dump_round_trips(write, recipe_dir: Path) -> None:
    loaded = load_recipe(write('extends = "base.toml"\n[optim]\nlr = 3e-4\n'))
    elsewhere = recipe_dir / "run"  # as a run folder's config.toml: no base.toml beside it
    elsewhere.mkdir()
    out = elsewhere / "config.toml"
    out.write_text(dump_recipe(loaded.config))
    assert load_recipe(out).config == msgspec.structs.replace(loaded.config, extends=None)
    assert out.read_text().startswith("# resolved recipe; it extended 'base.toml'")


@pytest.mark.parametrize(
    ("text", "overrides", "file", "needle"),
    [
        ('extends = "base.toml"\n[bogus]\nx = 1\n', [], "recipe.toml", "unknown section [bogus]"),
        (
            'extends = "base.toml"\n[rollout]\nwrokers = 1\n',
            [],
            "recipe.toml",
            "unknown key rollout.wrokers (did you mean 'workers'?)",
        ),
        (
            'extends = "base.toml"\n[rollout]\nworkers = "four"\n',
            [],
            "recipe.toml",
            'rollout.workers = "four": expected int, got str',
        ),
        (
            'extends = "base.toml"\n[optim]\nlr = -1.0\n',
            [],
            "recipe.toml",
            "optim.lr = -1.0: expected float > 0.0",
        ),
        ('extends = "missing.toml"\n', [], "missing.toml", "recipe file not found"),
        ("[model\nkind = 1\n", [], "recipe.toml", "not valid TOML"),
        ('extends = "base.toml"\n', ["rollout.nope=1"], "--set rollout.nope", "unknown key 'nope'"),
        (
            'extends = "base.toml"\n[staleness]\nmode = "sync"\nmax_staleness = 2\n',
            [],
            "recipe.toml",
            "staleness.max_staleness = 2: must be 0",
        ),
        ('extends = "base.toml"\n[model]\nkind = "nope"\n', [], "recipe.toml", "model.kind"),
        (
            'extends = "base.toml"\n[algorithm]\nmode = "sft"\ndynamic_sampling = true\n',
            [],
            "recipe.toml",
            "algorithm.dynamic_sampling",
        ),
        (
            'extends = "base.toml"\n[inference]\nbackend = "none"\n',
            [],
            "recipe.toml",
            'inference.backend = "none" with algorithm.mode = "rl"',
        ),
        (
            'extends = "base.toml"\n[inference]\nbackend = "none"\n[algorithm]\nmode = "sft"\n',
            [],
            "recipe.toml",
            "the default rollout worker generates",
        ),
        (
            'extends = "base.toml"\n[inference]\nbackend = "none"\nservers = 2\n',
            [],
            "recipe.toml",
            "unknown key inference.servers (not a key of inference.backend = 'none')",
        ),
    ],
)
def test_errors_name_file_path_value_and_expectation(
    write, text: str, overrides: list[str], file: str, needle: str
) -> None:
    with pytest.raises(ConfigError) as info:
        load_recipe(write(text), overrides)
    message = str(info.value)
    assert "\n" not in message
    assert needle in message
    assert message.split(": ")[0].endswith(file)


def test_cyclic_extends_is_rejected(write, recipe_dir: Path) -> None:
    (recipe_dir / "a.toml").write_text('extends = "b.toml"\n')
    (recipe_dir / "b.toml").write_text('extends = "a.toml"\n')
    with pytest.raises(ConfigError, match=r"cyclic chain a.toml -> b.toml -> a.toml"):
        load_recipe(recipe_dir / "a.toml")


def test_error_points_at_the_base_file_that_set_the_value(write, recipe_dir: Path) -> None:
    (recipe_dir / "base.toml").write_text(
        (recipe_dir / "base.toml").read_text() + "[pool]\nbatch_groups = 0\n"
    )
    with pytest.raises(ConfigError) as info:
        load_recipe(write('extends = "base.toml"\n'))
    assert str(info.value).startswith(f"{recipe_dir / 'base.toml'}: pool.batch_groups = 0")


def test_missing_required_field(recipe_dir: Path) -> None:
    path = recipe_dir / "r.toml"
    path.write_text('[model]\nkind = "build"\n[tokenizer]\nkind="chars"\n[rollout]\nworkers = 1\n')
    with pytest.raises(ConfigError, match=r"rollout.evaluator is required but missing"):
        load_recipe(path)
