"""Observability: loguru set-up, metrics sinks, the run ledger, the run directory, progress.

Owns: ``logs`` (rank-aware loguru, stdlib routed in), ``metrics`` (jsonl / TensorBoard / W&B),
``ledger`` (typed events appended to events.jsonl), ``rundir`` (the run folder layout),
``progress`` (the live progress line), ``terminal`` (the stderr stream logs and progress share),
``jsonlines`` (the append-only, flushed JSON-lines file under metrics and ledger), ``plots``
(figures drawn from metrics.jsonl), ``glossary`` (every metric's unit and meaning).
Must not import: torch at module level; ``inference``, ``pipeline``, ``rollout``, ``train``,
``weights``, ``engine``.
"""

from __future__ import annotations

from nexrl_async.obs.ledger import (
    Admitted,
    Checkpointed,
    Dropped,
    Event,
    Failed,
    Pooled,
    Published,
    RunFinished,
    RunLedger,
    RunResumed,
    RunStarted,
    Scored,
    Trained,
    TurnGenerated,
    Validated,
    read_events,
)
from nexrl_async.obs.logs import InterceptHandler, reset_logging, setup_logging
from nexrl_async.obs.metrics import (
    JsonlMetrics,
    MetricsHub,
    TensorBoardMetrics,
    WandbMetrics,
    build_sinks,
    clean_metrics,
    read_metrics,
)
from nexrl_async.obs.progress import ProgressLine, format_progress
from nexrl_async.obs.rundir import RunDir
from nexrl_async.obs.terminal import Terminal

__all__ = [
    "Admitted",
    "Checkpointed",
    "Dropped",
    "Event",
    "Failed",
    "InterceptHandler",
    "JsonlMetrics",
    "MetricsHub",
    "Pooled",
    "ProgressLine",
    "Published",
    "RunDir",
    "RunFinished",
    "RunLedger",
    "RunResumed",
    "RunStarted",
    "Scored",
    "TensorBoardMetrics",
    "Terminal",
    "Trained",
    "TurnGenerated",
    "Validated",
    "WandbMetrics",
    "build_sinks",
    "clean_metrics",
    "format_progress",
    "read_events",
    "read_metrics",
    "reset_logging",
    "setup_logging",
]
