from __future__ import annotations

import importlib.util
import json
import math
from collections.abc import Mapping
from importlib.machinery import ModuleSpec
from pathlib import Path

import pytest

from nexrl_async.config.schema import LoggingConfig, WandbConfig
from nexrl_async.core.errors import ConfigError
from nexrl_async.core.protocols import MetricsSink
from nexrl_async.obs import (
    JsonlMetrics,
    MetricsHub,
    RunDir,
    TensorBoardMetrics,
    WandbMetrics,
    build_sinks,
    clean_metrics,
    read_metrics,
)


class ListSink:
    def __init__(self) -> None:
        self.logged: list[tuple[int, dict[str, float]]] = []
        self.closed = False

    def log(self, step: int, metrics: Mapping[str, float]) -> None:
        self.logged.append((step, dict(metrics)))

    def close(self) -> None:
        self.closed = True


class BrokenSink:
    def log(self, step: int, metrics: Mapping[str, float]) -> None:
        raise OSError("backend down")

    def close(self) -> None:
        raise OSError("backend down")


def test_jsonl_writes_one_flushed_object_per_step(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    sink = JsonlMetrics(path)
    assert isinstance(sink, MetricsSink)
    sink.log(0, {"rollout/reward_mean": 0.5, "train/loss": 1.25})
    sink.log(1, {"rollout/reward_mean": 0.75})
    lines = path.read_text().splitlines()  # before close: each write is already flushed
    assert len(lines) == 2
    first = json.loads(lines[0])
    assert list(first)[:2] == ["step", "time"]
    assert first["step"] == 0
    assert first["rollout/reward_mean"] == 0.5
    assert first["train/loss"] == 1.25
    sink.close()


def test_non_finite_values_are_written_as_null(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    sink = JsonlMetrics(path)
    sink.log(3, {"a": math.nan, "b": math.inf, "c": -math.inf, "d": 2.0})
    sink.close()
    raw = json.loads(path.read_text())  # strict JSON: no NaN tokens
    assert raw["a"] is None
    assert raw["b"] is None
    assert raw["c"] is None
    (record,) = read_metrics(path)
    assert record["step"] == 3
    assert record["d"] == 2.0
    assert record["a"] is None


def test_values_are_coerced_and_junk_is_dropped_with_one_warning(
    tmp_path: Path, log_messages: list[str]
) -> None:
    path = tmp_path / "metrics.jsonl"
    sink = JsonlMetrics(path)
    sink.log(0, {"n": 3, "flag": True, "bad": "abc", "step": 7.0})  # type: ignore[dict-item]
    sink.log(1, {"bad": None})  # type: ignore[dict-item]
    sink.close()
    first, second = read_metrics(path)
    assert first["step"] == 0  # a metric named "step" does not hide the record's own
    assert first["n"] == 3.0
    assert first["flag"] == 1.0
    assert "bad" not in first
    assert "bad" not in second
    assert sum("'bad'" in m for m in log_messages) == 1


def test_clean_metrics_without_memory_warns_every_time(log_messages: list[str]) -> None:
    assert clean_metrics({"x": "?", "y": 1}) == {"y": 1.0}
    assert clean_metrics({"x": "?"}) == {}
    assert sum("'x'" in m for m in log_messages) == 2


def test_jsonl_appends_on_resume_past_a_torn_line(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    sink = JsonlMetrics(path)
    sink.log(0, {"a": 1.0})
    sink.close()
    with path.open("ab") as file:
        file.write(b'{"step":1,"ti')
    sink = JsonlMetrics(path)
    sink.log(1, {"a": 2.0})
    sink.close()
    assert [r["a"] for r in read_metrics(path)] == [1.0, 2.0]


def test_hub_fans_out_and_survives_a_broken_sink(log_messages: list[str]) -> None:
    good = ListSink()
    hub = MetricsHub([BrokenSink(), good])
    hub.log(0, {"a": 1})
    hub.log(1, {"a": 2})
    hub.close()
    assert good.logged == [(0, {"a": 1.0}), (1, {"a": 2.0})]
    assert good.closed
    assert hub.failures == {"BrokenSink": 3}
    assert sum("BrokenSink" in m for m in log_messages) == 1
    assert isinstance(hub, MetricsSink)


def test_build_sinks_defaults_to_jsonl_only(tmp_path: Path) -> None:
    run = RunDir.create(tmp_path / "run", resume=False)
    sinks = build_sinks(LoggingConfig(), run, {"run": {"name": "x"}})
    assert [type(s) for s in sinks] == [JsonlMetrics]
    MetricsHub(sinks).log(0, {"a": 1.0})
    for sink in sinks:
        sink.close()
    assert read_metrics(run.metrics_path)[0]["a"] == 1.0


@pytest.fixture
def nothing_optional_installed(monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.util.find_spec

    def find_spec(name: str, package: str | None = None) -> ModuleSpec | None:
        if name in ("tensorboard", "wandb"):
            return None
        return real(name, package)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)


@pytest.mark.usefixtures("nothing_optional_installed")
@pytest.mark.parametrize(
    ("cfg", "field", "extra"),
    [
        (LoggingConfig(tensorboard=True), "logging.tensorboard", "nexrl-async[tensorboard]"),
        (
            LoggingConfig(wandb=WandbConfig(enabled=True)),
            "logging.wandb.enabled",
            "nexrl-async[wandb]",
        ),
    ],
)
def test_enabled_but_missing_backend_is_a_config_error(
    tmp_path: Path, cfg: LoggingConfig, field: str, extra: str
) -> None:
    run = RunDir.create(tmp_path / "run", resume=False)
    with pytest.raises(ConfigError) as info:
        build_sinks(cfg, run, {})
    assert field in str(info.value)
    assert extra in str(info.value)
    assert info.value.path == field
    assert not run.metrics_path.exists()  # checked before any sink was opened


def test_tensorboard_writes_event_files(tmp_path: Path) -> None:
    pytest.importorskip("tensorboard")
    sink = TensorBoardMetrics(tmp_path / "tb")
    sink.log(0, {"a/b": 1.0, "c": math.nan})
    sink.close()
    assert any(p.name.startswith("events.out.tfevents") for p in (tmp_path / "tb").iterdir())


def test_wandb_offline_needs_no_network(tmp_path: Path) -> None:
    pytest.importorskip("wandb")
    sink = WandbMetrics("nexrl-test", None, mode="offline", dir=tmp_path, config={"k": 1})
    sink.log(0, {"a": 1.0})
    sink.close()
    assert (tmp_path / "wandb").is_dir()
