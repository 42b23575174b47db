"""User code by ``file.py:Name``: sibling imports, scoped to the file's folder."""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path

import pytest

from nexrl_async.core.errors import UserCodeError
from nexrl_async.core.usercode import PACKAGE_PREFIX, folder_package, load_object


def write(folder: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))
    return folder


def task_folder(root: Path, label: str) -> Path:
    """A recipe folder whose ``flaky_eval.py`` imports its sibling ``evaluator.py``."""
    return write(
        root / label,
        {
            "evaluator.py": f"""
                from helpers import shout
                LABEL = {label!r}
                class Exact:
                    def evaluate(self, item, trajectory):
                        return shout(LABEL)
            """,
            "helpers.py": "def shout(text):\n    return text.upper()\n",
            "flaky_eval.py": """
                from evaluator import Exact, LABEL
                from . import helpers as relative_helpers
                class Flaky(Exact):
                    pass
                def lazy_label():
                    import evaluator  # imported when called, after the module ran
                    return evaluator.LABEL
            """,
        },
    )


def test_a_file_imports_its_siblings(tmp_path: Path) -> None:
    folder = task_folder(tmp_path, "alpha")
    flaky = load_object("flaky_eval.py:Flaky", folder)
    assert flaky().evaluate(None, None) == "ALPHA"  # evaluator.py itself imports helpers.py
    module = sys.modules[flaky.__module__]
    assert module.__name__ == f"{folder_package(folder)}.flaky_eval"
    assert module.lazy_label() == "alpha"
    assert module.relative_helpers.shout("x") == "X"


def test_a_sibling_and_its_ref_are_one_module(tmp_path: Path) -> None:
    folder = task_folder(tmp_path, "alpha")
    flaky = load_object("flaky_eval.py:Flaky", folder)
    exact = load_object("evaluator.py:Exact", folder)
    assert issubclass(flaky, exact)


def test_two_folders_do_not_leak_into_each_other(tmp_path: Path) -> None:
    alpha = load_object("flaky_eval.py:lazy_label", task_folder(tmp_path, "alpha"))
    beta = load_object("flaky_eval.py:lazy_label", task_folder(tmp_path, "beta"))
    assert (alpha(), beta()) == ("alpha", "beta")
    assert alpha() == "alpha"  # still its own after the other folder loaded
    for leaked in ("evaluator", "helpers", "flaky_eval"):
        assert leaked not in sys.modules
    alpha_eval = load_object("evaluator.py:Exact", tmp_path / "alpha")
    beta_eval = load_object("evaluator.py:Exact", tmp_path / "beta")
    assert alpha_eval is not beta_eval
    assert beta_eval().evaluate(None, None) == "BETA"


def test_packages_in_the_folder_and_names_it_lacks(tmp_path: Path) -> None:
    folder = write(
        tmp_path / "pkgtask",
        {
            "lib/__init__.py": "from .text import clean\n",
            "lib/text.py": "import json\ndef clean(s):\n    return json.dumps(s.strip())\n",
            "task.py": "import lib.text\nimport json\nVALUE = lib.text.clean(' x ')\n",
        },
    )
    assert load_object("task.py:VALUE", folder) == '"x"'
    assert "lib" not in sys.modules
    assert sys.modules["json"].__name__ == "json"  # a name the folder lacks imports as usual


def test_a_missing_sibling_is_a_clear_error(tmp_path: Path) -> None:
    folder = write(tmp_path / "broken", {"task.py": "from nowhere_to_be_found import X\n"})
    expected = r"task\.py:X.*ModuleNotFoundError.*nowhere_to_be_found"
    with pytest.raises(UserCodeError, match=expected):
        load_object("task.py:X", folder)
    assert not any(name.startswith(folder_package(folder) + ".") for name in sys.modules), (
        "a failed import leaves no module behind"
    )


def test_private_package_names(tmp_path: Path) -> None:
    assert folder_package(tmp_path).startswith(PACKAGE_PREFIX)
    assert folder_package(tmp_path) == folder_package(tmp_path / "x" / "..")
    assert folder_package(tmp_path / "a") != folder_package(tmp_path / "b")
