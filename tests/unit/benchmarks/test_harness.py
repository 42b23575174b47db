"""benchmarks/harness.py: tables, JSON, server processes stopped by their handle."""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import pytest

Loader = Callable[[str], ModuleType]


@pytest.fixture
def harness(load_benchmark: Loader) -> ModuleType:
    return load_benchmark("harness")


def test_table_aligns_columns_and_formats_numbers(harness: ModuleType):
    text = harness.table(["mode", "step s"], [["sync", 2.5], ["batch-async k=1", math.nan]])
    lines = text.splitlines()
    assert lines[0].split() == ["mode", "step", "s"]
    assert len({len(line) for line in lines}) == 1
    assert lines[2].endswith("2.500")
    assert lines[3].endswith("-")


def test_json_results_have_no_nan(harness: ModuleType, tmp_path: Path):
    path = harness.write_json(tmp_path / "out", "x", {"a": math.nan, "b": [1.0, math.inf]})
    assert json.loads(path.read_text()) == {"a": None, "b": [1.0, None]}


def test_a_server_that_exits_early_is_reported_with_its_log(harness: ModuleType, tmp_path: Path):
    argv = [sys.executable, "-c", "print('cannot start'); raise SystemExit(3)"]
    with (
        pytest.raises(RuntimeError, match="exited with 3") as info,
        harness.server_process(argv, port=harness.free_port(), log_path=tmp_path / "s.log"),
    ):
        pass
    assert "cannot start" in str(info.value)


def test_a_server_is_stopped_by_its_handle(harness: ModuleType, tmp_path: Path):
    port = harness.free_port()
    argv = harness.simulated_server_argv(port, token_latency_s=0.0)
    with harness.server_process(argv, port=port, log_path=tmp_path / "s.log") as server:
        assert server.url.endswith(f":{port}")
        assert server.process.poll() is None
    assert server.process.poll() is not None
