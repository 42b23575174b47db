"""``[data]`` kinds in a recipe: a mixture's shape, its checks and error paths; ``kind = "hf"``."""

from __future__ import annotations

from pathlib import Path

import msgspec
import pytest

from nexrl_async.config.data import HFData, JsonlData, MixtureData, PythonData
from nexrl_async.config.loader import dump_recipe, load_recipe
from nexrl_async.config.preflight import data_paths, summary, user_refs
from nexrl_async.core.errors import ConfigError

MIXTURE = """extends = "base.toml"
[data]
kind = "mixture"
seed = 3
required = ["prompt"]
[[data.sources]]
name = "easy"
weight = 3
kind = "jsonl"
path = "train.jsonl"
[[data.sources]]
name = "gen"
weight = 1
kind = "python"
factory = "gen.py:rows"
fields = { prompt = "q" }
"""


def test_a_mixture_recipe_loads_with_paths_resolved_per_source(write, recipe_dir: Path) -> None:
    sub = recipe_dir / "sub"
    sub.mkdir()
    (sub / "mix.toml").write_text(MIXTURE.replace("base.toml", "../base.toml"))
    loaded = load_recipe(sub / "mix.toml")
    data = loaded.config.data
    assert isinstance(data, MixtureData)
    easy, gen = data.sources
    assert isinstance(easy, JsonlData)
    assert isinstance(gen, PythonData)
    assert (easy.name, easy.weight, gen.name, gen.weight) == ("easy", 3.0, "gen", 1.0)
    assert easy.path == str(sub / "train.jsonl")
    assert gen.factory == f"{sub / 'gen.py'}:rows"
    assert gen.fields == {"prompt": "q"}
    assert (data.seed, data.exhaustion, data.required, data.max_replays) == (
        3,
        "stop",
        ["prompt"],
        2,
    )
    assert next(iter(data_paths(loaded.config))) == ("data.sources.0.path", easy.path)
    assert ("data.sources.1.factory", gen.factory) in list(user_refs(loaded.config))
    assert "easy 75% (" in summary(loaded)
    assert "gen 25% (" in summary(loaded)
    dumped = recipe_dir / "config.toml"
    dumped.write_text(dump_recipe(loaded.config))
    assert load_recipe(dumped).config == msgspec.structs.replace(loaded.config, extends=None)


@pytest.mark.parametrize(
    ("edit", "path", "says"),
    [
        (('name = "gen"', 'name = "easy"'), "data.sources.1.name", "data.sources.0 has it too"),
        (('name = "gen"\n', ""), "data.sources.1.name", "every source of a mixture needs one"),
        (("weight = 1\n", "weight = 0\n"), "data.sources.1.weight", "> 0"),
        (("weight = 1\n", "weight = -2\n"), "data.sources.1.weight", "> 0"),
        (("weight = 1\n", "weight = inf\n"), "data.sources.1.weight", "<= 1000000"),
        (('name = "gen"', 'name = "a/b"'), "data.sources.1.name", "a/b"),
        (
            ("weight = 1\n", "weight = 1\nrequired = ['q']\n"),
            "data.sources.1.required",
            "set required on [data]",
        ),
        (
            ("weight = 1\n", "weight = 1\nmax_replays = 5\n"),
            "data.sources.1.max_replays",
            "set max_replays on [data]",
        ),
        (("weight = 1\n", "weight = 1\nbogus = 1\n"), "data.sources.1.bogus", "unknown key"),
        (('kind = "python"', 'kind = "mixture"'), "data.sources.1.kind", "mixture"),
        (('exhaustion = "stop"', 'exhaustion = "never"'), "data.exhaustion", "never"),
    ],
)
def test_mixture_mistakes_name_the_field(
    write, edit: tuple[str, str], path: str, says: str
) -> None:
    text = MIXTURE.replace("seed = 3\n", 'seed = 3\nexhaustion = "stop"\n')
    assert edit[0] in text
    with pytest.raises(ConfigError) as info:
        load_recipe(write(text.replace(edit[0], edit[1], 1)))
    assert info.value.path == path, str(info.value)
    assert says in str(info.value)


def test_a_mixture_needs_a_source(write) -> None:
    with pytest.raises(ConfigError) as info:
        load_recipe(write('extends = "base.toml"\n[data]\nkind = "mixture"\nsources = []\n'))
    assert info.value.path == "data.sources"


def test_a_weight_outside_a_mixture_is_refused(write) -> None:
    with pytest.raises(ConfigError) as info:
        load_recipe(write('extends = "base.toml"\n[data]\nweight = 2\n'))
    assert info.value.path == "data.weight"
    assert "only the sources of a mixture have weights" in str(info.value)


def test_validation_data_may_be_a_mixture_and_is_checked_too(write) -> None:
    text = MIXTURE.replace("[data]", "[validation.data]").replace(
        "data.sources", "validation.data.sources"
    )
    loaded = load_recipe(write(text))
    assert isinstance(loaded.config.validation.data, MixtureData)
    with pytest.raises(ConfigError) as info:
        load_recipe(write(text.replace('name = "gen"', 'name = "easy"')))
    assert info.value.path == "validation.data.sources.1.name"


def test_a_single_source_may_be_named(write) -> None:
    cfg = load_recipe(write('extends = "base.toml"\n[data]\nname = "train"\n')).config
    assert cfg.data.name == "train"  # type: ignore[union-attr]


def test_hf_source_fields(write, recipe_dir: Path) -> None:
    text = (
        'extends = "base.toml"\n[data]\nkind = "hf"\ndataset = "openai/gsm8k"\nsubset = "main"\n'
        'split = "train"\ncache_dir = "hf"\nfields = { prompt = "question" }\n'
    )
    data = load_recipe(write(text)).config.data
    assert isinstance(data, HFData)
    assert (data.dataset, data.subset, data.split) == ("openai/gsm8k", "main", "train")
    assert data.cache_dir == str(recipe_dir / "hf")
    for bad in ("../x", "a/b/c", "/abs", ""):
        with pytest.raises(ConfigError) as info:
            load_recipe(write(text.replace("openai/gsm8k", bad)))
        assert info.value.path == "data.dataset"


def test_set_reaches_into_a_mixtures_sources(write) -> None:
    path = write(MIXTURE)
    data = load_recipe(
        path, ["data.sources.1.weight=5", "data.sources.0.shuffle=false"]
    ).config.data
    assert isinstance(data, MixtureData)
    assert [s.weight for s in data.sources] == [3.0, 5.0]
    assert data.sources[0].shuffle is False
    kind = ['data.sources.0.kind="hf"', 'data.sources.0.dataset="org/set"']
    switched = load_recipe(path, [*kind, 'data.sources.0.name="hub"']).config.data
    assert isinstance(switched, MixtureData)
    assert isinstance(switched.sources[0], HFData)  # its jsonl "path" went with the old kind
    assert (switched.sources[0].name, switched.sources[0].weight) == ("hub", 1.0)
    whole = load_recipe(path, ['data.sources.1={name = "g", kind = "jsonl", path = "x.jsonl"}'])
    assert isinstance(whole.config.data, MixtureData)
    assert whole.config.data.sources[1].name == "g"


@pytest.mark.parametrize("key", ["data.sources.2.weight", "data.sources.x.weight"])
def test_set_refuses_a_source_the_recipe_lacks(write, key: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_recipe(write(MIXTURE), [f"{key}=1"])
    assert info.value.path == key
    assert "data.sources has 2 entries" in str(info.value)


def test_a_source_may_name_its_own_evaluator(write, recipe_dir: Path) -> None:
    text = MIXTURE.replace('name = "gen"\n', 'name = "gen"\nevaluator = "evaluator.py:Evaluator"\n')
    loaded = load_recipe(write(text))
    data = loaded.config.data
    assert isinstance(data, MixtureData)
    ref = f"{recipe_dir / 'evaluator.py'}:Evaluator"
    assert data.sources[1].evaluator == ref
    assert ("data.sources.1.evaluator", ref) in list(user_refs(loaded.config))
    with pytest.raises(ConfigError) as info:
        load_recipe(write('extends = "base.toml"\n[data]\nevaluator = "evaluator.py:Evaluator"\n'))
    assert info.value.path == "data.evaluator"
    assert "per-source ones are for" in str(info.value)
