"""Load the benchmark scripts (``benchmarks/*.py``) as modules, their folder on ``sys.path``."""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import pytest

BENCHMARKS = Path(__file__).resolve().parents[3] / "benchmarks"

_LOADED: dict[str, ModuleType] = {}


@pytest.fixture
def load_benchmark(monkeypatch: pytest.MonkeyPatch) -> Callable[[str], ModuleType]:
    """``load_benchmark("pipeline")`` → the script as module ``bench_pipeline`` (cached)."""
    monkeypatch.syspath_prepend(str(BENCHMARKS))

    def load(name: str) -> ModuleType:
        if name not in _LOADED:
            path = BENCHMARKS / f"{name}.py"
            spec = importlib.util.spec_from_file_location(f"bench_{name}", path)
            assert spec is not None
            assert spec.loader is not None
            module = importlib.util.module_from_spec(spec)
            sys.modules[spec.name] = module
            spec.loader.exec_module(module)
            _LOADED[name] = module
        return _LOADED[name]

    return load
