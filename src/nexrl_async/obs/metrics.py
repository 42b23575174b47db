"""Metrics sinks: each step's flat dict of float metrics goes to jsonl, and TensorBoard / W&B.

Every sink satisfies :class:`nexrl_async.core.protocols.MetricsSink` (``log(step, metrics)``,
``close()``). Keys are slash-namespaced (``rollout/reward_mean``).

Values are floats. Anything ``float()`` accepts (ints, bools, numpy or 0-d torch scalars) is
converted; a value that does not convert is dropped with one warning per key. Non-finite
values (NaN, ±inf) are kept as floats for TensorBoard and W&B, and written as ``null`` in
``metrics.jsonl`` (JSON has no NaN); :func:`read_metrics` gives them back as ``None``.

Logging metrics never crashes the run: :class:`MetricsHub` isolates each sink and reports a
failing one with a warning. Only rank 0 builds sinks.
"""

from __future__ import annotations

import importlib.util
import math
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import msgspec
from loguru import logger

from nexrl_async.config.schema import LoggingConfig
from nexrl_async.core.errors import ConfigError
from nexrl_async.core.protocols import MetricsSink
from nexrl_async.obs.jsonlines import JsonlWriter, iter_lines
from nexrl_async.obs.rundir import RunDir

_RESERVED = ("step", "time")


def clean_metrics(metrics: Mapping[str, Any], warned: set[str] | None = None) -> dict[str, float]:
    """``metrics`` with every value converted by ``float()``; unconvertible ones dropped.

    A drop is logged as a warning, once per key when a ``warned`` set is given to remember by.
    """
    clean: dict[str, float] = {}
    for key, value in metrics.items():
        try:
            clean[str(key)] = float(value)
        except (TypeError, ValueError):
            _warn_once(warned, str(key), f"metric {key!r} = {value!r} is not a number; dropped")
    return clean


class JsonlMetrics:
    """Appends ``{"step": s, "time": t, ...metrics}`` per :meth:`log` to ``path``, flushed.

    ``time`` is ``time.time()``. Non-finite values are written as ``null``. Metric keys named
    ``step`` or ``time`` are dropped (they would hide the record's own).
    """

    def __init__(self, path: Path) -> None:
        self._writer = JsonlWriter(path)
        self._warned: set[str] = set()

    @property
    def path(self) -> Path:
        return self._writer.path

    def log(self, step: int, metrics: Mapping[str, float]) -> None:
        record: dict[str, float | int | None] = {"step": int(step), "time": time.time()}
        for key, value in clean_metrics(metrics, self._warned).items():
            if key in _RESERVED:
                message = f"metric key {key!r} is reserved in metrics.jsonl; dropped"
                _warn_once(self._warned, key, message)
                continue
            record[key] = value if math.isfinite(value) else None
        self._writer.write_line(msgspec.json.encode(record))

    def close(self) -> None:
        self._writer.close()


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """Every record of a ``metrics.jsonl`` in order (``null`` values as ``None``; torn lines
    from a killed run skipped)."""
    records: list[dict[str, Any]] = []
    for number, line in iter_lines(path):
        try:
            record = msgspec.json.decode(line, type=dict[str, Any])
        except msgspec.DecodeError:
            logger.warning("{}:{}: torn line skipped", path, number)
            continue
        records.append(record)
    return records


class TensorBoardMetrics:
    """Writes scalars to TensorBoard event files under ``log_dir`` (needs ``tensorboard``)."""

    def __init__(self, log_dir: Path) -> None:
        _require("tensorboard", "logging.tensorboard", "tensorboard")
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as err:
            raise ConfigError(
                f"logging.tensorboard: cannot import torch.utils.tensorboard ({err})",
                path="logging.tensorboard",
            ) from err
        self._writer = SummaryWriter(log_dir=str(log_dir))

    def log(self, step: int, metrics: Mapping[str, float]) -> None:
        for key, value in clean_metrics(metrics).items():
            self._writer.add_scalar(key, value, global_step=step)
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()


class WandbMetrics:
    """Logs to a Weights & Biases run (needs ``wandb``); ``mode="offline"`` needs no network.

    Offline runs are written under ``dir``/wandb; upload them later with ``wandb sync``.
    """

    def __init__(
        self,
        project: str,
        entity: str | None = None,
        *,
        mode: str = "offline",
        dir: Path,
        config: Mapping[str, Any] | None = None,
        name: str | None = None,
    ) -> None:
        _require("wandb", "logging.wandb.enabled", "wandb")
        import wandb

        try:
            self._run = wandb.init(
                project=project,
                entity=entity,
                mode=mode,
                dir=str(dir),
                config=dict(config or {}),
                name=name,
            )
        except Exception as err:  # wandb raises its own assorted errors at start-up
            raise ConfigError(
                f"logging.wandb: could not start a W&B run ({type(err).__name__}: {err})",
                path="logging.wandb",
            ) from err

    def log(self, step: int, metrics: Mapping[str, float]) -> None:
        self._run.log(clean_metrics(metrics), step=step)

    def close(self) -> None:
        self._run.finish()


class MetricsHub:
    """Fans every :meth:`log` out to ``sinks``; a failing sink is reported and skipped.

    Each sink's first failure is logged with its traceback, later ones are counted (see
    :attr:`failures`); the other sinks and the run carry on.
    """

    def __init__(self, sinks: Sequence[MetricsSink]) -> None:
        self.sinks = list(sinks)
        self.failures: dict[str, int] = {}
        self._warned: set[str] = set()

    def log(self, step: int, metrics: Mapping[str, float]) -> None:
        clean = clean_metrics(metrics, self._warned)
        for sink in self.sinks:
            self._call(sink, "log", step, clean)

    def close(self) -> None:
        for sink in self.sinks:
            self._call(sink, "close")

    def _call(self, sink: MetricsSink, method: str, *args: Any) -> None:
        name = type(sink).__name__
        try:
            getattr(sink, method)(*args)
        except Exception:  # noqa: BLE001 - a metrics backend must never take the run down
            count = self.failures.get(name, 0) + 1
            self.failures[name] = count
            if count == 1:
                logger.opt(exception=True).warning("metrics sink {} failed in {}", name, method)


def build_sinks(
    cfg: LoggingConfig, run_dir: RunDir, config_dict: Mapping[str, Any]
) -> list[MetricsSink]:
    """The sinks ``cfg`` asks for: always jsonl, plus TensorBoard / W&B when enabled.

    Raises :class:`ConfigError` naming the field and the extra to install when an enabled
    backend is not installed (checked before any sink is opened).
    """
    require_sink_backends(cfg)
    sinks: list[MetricsSink] = [JsonlMetrics(run_dir.metrics_path)]
    if cfg.tensorboard:
        sinks.append(TensorBoardMetrics(run_dir.tensorboard_dir))
    if cfg.wandb.enabled:
        sinks.append(
            WandbMetrics(
                cfg.wandb.project,
                cfg.wandb.entity,
                mode=cfg.wandb.mode,
                dir=run_dir.root,
                config=config_dict,
                name=run_dir.root.name,
            )
        )
    return sinks


def require_sink_backends(cfg: LoggingConfig) -> None:
    """Raise :class:`ConfigError` naming the field and the extra to install when a sink ``cfg``
    enables is not installed (the run's pre-flight calls it too)."""
    if cfg.tensorboard:
        _require("tensorboard", "logging.tensorboard", "tensorboard")
    if cfg.wandb.enabled:
        _require("wandb", "logging.wandb.enabled", "wandb")


def _require(module: str, field: str, extra: str) -> None:
    if importlib.util.find_spec(module) is None:
        raise ConfigError(
            f"{field} is on but {module!r} is not installed: "
            f"pip install 'nexrl-async[{extra}]' (or turn {field} off)",
            path=field,
        )


def _warn_once(warned: set[str] | None, key: str, message: str) -> None:
    if warned is not None:
        if key in warned:
            return
        warned.add(key)
    logger.warning(message)
