"""``kind = "hf"``: a Hub dataset by name from a local ``datasets`` cache, never the network.

The cache is filled as ``datasets.load_dataset("namespace/name")`` leaves it after a download:
the dataset's files go through the library's own builder (``load_dataset_builder`` on a folder
named after the dataset), which prepares ``<cache>/<name>/<subset>/<version>/<hash>/`` (the
Arrow files and ``dataset_info.json``); for a namespaced id the folder is then renamed
``<namespace>___<name>``, the name a Hub download gets (the builder refuses a Hub ``repo_id``
for local files). Only the download itself, impossible offline, is replaced.
"""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from nexrl_async.cli import main
from nexrl_async.config.data import HFData, MixtureData
from nexrl_async.config.hub_cache import datasets_cache
from nexrl_async.core.errors import DataError
from nexrl_async.data import open_source

datasets = pytest.importorskip("datasets")

TRAIN = [{"question": f"<bos>{i:02d}<sep>", "answer": f"{i:02d}"[::-1]} for i in range(6)]
TEST = [{"question": f"<bos>{i:02d}<sep>", "answer": f"{i:02d}"[::-1]} for i in range(90, 93)]


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))


def prepare(
    cache: Path,
    work: Path,
    repo_id: str,
    files: dict[str, list[dict[str, Any]]],
    subsets: list[str] | None = None,
) -> None:
    """Prepare ``repo_id`` in ``cache`` as a Hub download would, from ``files``
    (``{"train.jsonl": rows}``, or ``{"<subset>/train.jsonl": rows}`` with ``subsets``)."""
    *namespace, name = repo_id.split("/")
    folder = work / name  # the builder names the cache folder (and its files) after it
    for file, rows in files.items():
        write_jsonl(folder / file, rows)
    if subsets:
        configs = "".join(
            f"- config_name: {s}\n  data_files:\n  - split: train\n    path: {s}/train.jsonl\n"
            for s in subsets
        )
        (folder / datasets.config.REPOCARD_FILENAME).write_text(f"---\nconfigs:\n{configs}---\n")
    for subset in subsets or [None]:
        builder = datasets.load_dataset_builder(str(folder), subset, cache_dir=str(cache))
        builder.download_and_prepare()
    if namespace:
        snake = datasets.naming.camelcase_to_snakecase(name)
        (cache / snake).rename(cache / f"{namespace[0]}___{snake}")


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty ``datasets`` cache that ``HF_DATASETS_CACHE`` points at."""
    path = tmp_path / "hf_cache"
    path.mkdir()
    monkeypatch.setenv("HF_DATASETS_CACHE", str(path))
    return path


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    """Every attempt to resolve a host or open a connection is recorded and refused."""
    attempts: list[str] = []

    def refuse(*args: Any, **kwargs: Any) -> Any:
        attempts.append(repr(args[:2]))
        raise OSError("network refused by the test")

    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)
    return attempts


def test_a_cached_hub_dataset_loads_by_name_without_touching_the_network(
    cache: Path, tmp_path: Path, no_network: list[str]
) -> None:
    prepare(
        cache, tmp_path / "src", "nexrl-test/TinyDigits", {"train.jsonl": TRAIN, "test.jsonl": TEST}
    )
    assert list(cache.glob("nexrl-test___tiny_digits/default/*/*/dataset_info.json"))
    offline_before = datasets.config.HF_HUB_OFFLINE
    cfg = HFData(
        dataset="nexrl-test/TinyDigits",
        split="train",
        fields={"prompt": "question"},
        required=["prompt", "answer"],
        shuffle=False,
    )
    source = open_source(cfg, base_dir=tmp_path)
    items = [source.next_item() for _ in range(len(TRAIN))]
    assert [i.fields for i in items if i] == [
        {"prompt": r["question"], "answer": r["answer"]} for r in TRAIN
    ]
    assert source.next_item() is None
    test = open_source(
        HFData(dataset="nexrl-test/TinyDigits", split="test", max_items=2, shuffle=False),
        base_dir=tmp_path,
    )
    assert [test.next_item().fields["answer"] for _ in range(2)] == ["09", "19"]  # type: ignore[union-attr]
    assert offline_before == datasets.config.HF_HUB_OFFLINE  # the switch is put back
    assert no_network == []


def test_splits_and_subsets_are_chosen_or_asked_for(cache: Path, tmp_path: Path) -> None:
    prepare(
        cache, tmp_path / "a", "nexrl-test/two_splits", {"train.jsonl": TRAIN, "test.jsonl": TEST}
    )
    with pytest.raises(DataError, match=r"'nexrl-test/two_splits' has splits .*set split"):
        open_source(HFData(dataset="nexrl-test/two_splits"), base_dir=tmp_path)
    with pytest.raises(DataError, match="nexrl-test/two_splits"):
        open_source(HFData(dataset="nexrl-test/two_splits", split="valid"), base_dir=tmp_path)
    prepare(cache, tmp_path / "b", "one_split", {"train.jsonl": TEST})
    assert len(open_source(HFData(dataset="one_split"), base_dir=tmp_path)) == len(TEST)
    prepare(
        cache,
        tmp_path / "c",
        "nexrl-test/levels",
        {"easy/train.jsonl": TRAIN, "hard/train.jsonl": TEST},
        subsets=["easy", "hard"],
    )
    with pytest.raises(DataError, match=r"several cached subsets \['easy', 'hard'\]"):
        open_source(HFData(dataset="nexrl-test/levels"), base_dir=tmp_path)
    with pytest.raises(DataError, match="subset 'medium' is not cached"):
        open_source(HFData(dataset="nexrl-test/levels", subset="medium"), base_dir=tmp_path)
    hard = open_source(HFData(dataset="nexrl-test/levels", subset="hard"), base_dir=tmp_path)
    assert len(hard) == len(TEST)
    cfg = MixtureData(
        sources=[
            HFData(name="easy", weight=3, dataset="nexrl-test/levels", subset="easy"),
            HFData(name="hard", weight=1, dataset="nexrl-test/levels", subset="hard"),
        ],
        exhaustion="rest",
    )
    mixed = open_source(cfg, base_dir=tmp_path)
    keys = [item.key for item in iter(mixed.next_item, None)]
    assert sorted(keys) == sorted(
        [f"easy/0:{i}" for i in range(6)] + [f"hard/0:{i}" for i in range(3)]
    )


def test_a_dataset_missing_from_the_cache_is_named(cache: Path, tmp_path: Path) -> None:
    with pytest.raises(DataError) as info:
        open_source(HFData(dataset="nexrl-test/absent"), base_dir=tmp_path)
    text = str(info.value)
    assert "'nexrl-test/absent' is not in the local Hugging Face cache" in text
    assert str(cache) in text
    assert "nexrl-test___absent" in text


RECIPE = """
[model]
kind = "build"

[tokenizer]
kind = "chars"

[rollout]
evaluator = "evaluator.py:Evaluator"
"""


@pytest.mark.parametrize(
    ("data", "field"),
    [
        ('[data]\nkind = "hf"\ndataset = "nexrl-test/absent"\nsplit = "train"\n', "data.dataset"),
        (
            '[data]\nkind = "mixture"\n[[data.sources]]\nname = "a"\nkind = "jsonl"\n'
            'path = "a.jsonl"\n[[data.sources]]\nname = "b"\nkind = "hf"\n'
            'dataset = "nexrl-test/absent"\n',
            "data.sources.1.dataset",
        ),
    ],
)
@pytest.mark.parametrize("command", ["check", "run"])
def test_check_and_run_exit_2_naming_the_field_and_the_dataset(
    cache: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    data: str,
    field: str,
    command: str,
) -> None:
    write_jsonl(tmp_path / "a.jsonl", [{"prompt": "1"}])
    (tmp_path / "evaluator.py").write_text("def evaluate(item, trajectory):\n    return 0.0\n")
    recipe = tmp_path / "recipe.toml"
    recipe.write_text(RECIPE + data)
    extra = ["--output", str(tmp_path / "out")] if command == "run" else []
    with pytest.raises(SystemExit) as info:
        main([command, str(recipe), *extra])
    err = capsys.readouterr().err
    assert info.value.code == 2, err
    assert f"{field} = 'nexrl-test/absent'" in err
    assert "is not in the local Hugging Face cache" in err
    assert not (tmp_path / "out").exists()  # refused before the run folder was made


def test_the_cache_folder_follows_the_environment_at_every_call(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in ("HF_DATASETS_CACHE", "HF_HOME", "XDG_CACHE_HOME"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert datasets_cache() == tmp_path / "home" / ".cache" / "huggingface" / "datasets"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert datasets_cache() == tmp_path / "xdg" / "huggingface" / "datasets"
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    assert datasets_cache() == tmp_path / "hf" / "datasets"
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "ds"))
    assert datasets_cache() == tmp_path / "ds"
    assert datasets_cache(str(tmp_path / "mine")) == tmp_path / "mine"
