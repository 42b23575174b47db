"""Shared fixtures of the multi-process tests."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

import pytest

DRIVER = Path(__file__).with_name("ranks_driver.py")
"""The script every rank of these tests runs (loaded by path: tests are not a package)."""


@pytest.fixture(scope="module")
def driver() -> ModuleType:
    spec = importlib.util.spec_from_file_location("ranks_driver", DRIVER)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
