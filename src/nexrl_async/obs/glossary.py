"""Every metric a run logs, with its unit and meaning: the source of docs/metrics.md.

The entries live in ``glossary.toml`` next to this module, one line per metric. A name may
hold ``<placeholders>`` (``rollout/failed/<reason>``) that stand for one path segment. Tests
keep the list honest: every metric a real run writes to ``metrics.jsonl`` and every metric name
spelled out in the source must match an entry (``tests/unit/obs``,
``tests/integration/engine``). Regenerate the page after adding an entry::

    python -m nexrl_async.obs.glossary docs/metrics.md
"""

from __future__ import annotations

import functools
import re
import sys
import tomllib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nexrl_async.config.reference import generated_doc_main

COMMAND = "python -m nexrl_async.obs.glossary docs/metrics.md"
"""The command that regenerates docs/metrics.md (run from the repository root)."""


@dataclass(frozen=True)
class MetricDoc:
    name: str
    unit: str
    meaning: str


@dataclass(frozen=True)
class Area:
    name: str
    intro: str
    metrics: tuple[MetricDoc, ...]


SOURCE = Path(__file__).with_name("glossary.toml")
"""The entries, one line per metric (``[name, unit, meaning]``), grouped by area."""

NOT_LOGGED = frozenset({"rollout/generated_tokens"})
"""Names in the source that never reach the sinks (turned into ``throughput/tokens_per_s``)."""


@functools.cache
def areas() -> tuple[Area, ...]:
    """The glossary as :data:`SOURCE` holds it (read once)."""
    raw = tomllib.loads(SOURCE.read_text(encoding="utf-8"))
    return tuple(
        Area(
            name=str(area["name"]),
            intro=str(area.get("intro", "")),
            metrics=tuple(MetricDoc(*map(str, entry)) for entry in area["metrics"]),
        )
        for area in raw["area"]
    )


def entries() -> list[MetricDoc]:
    return [doc for area in areas() for doc in area.metrics]


def _pattern(name: str) -> re.Pattern[str]:
    parts = re.split(r"(<[a-z_]+>)", name)
    body = "".join("[^/]+" if p.startswith("<") else re.escape(p) for p in parts)
    return re.compile(body)


def describe(name: str) -> MetricDoc | None:
    """The glossary entry ``name`` matches (exact names before placeholders), or ``None``."""
    docs = entries()
    for doc in docs:
        if doc.name == name:
            return doc
    for doc in docs:
        if "<" in doc.name and _pattern(doc.name).fullmatch(name):
            return doc
    return None


def render() -> str:
    """docs/metrics.md."""
    lines = [
        "# Metrics",
        "",
        f"<!-- Generated from src/nexrl_async/obs/glossary.toml by `{COMMAND}`. -->",
        "",
        "Every step appends one line to `<run>/metrics.jsonl` (`step`, `time`, then the metrics",
        "below) and sends the same values to TensorBoard and W&B when they are on. A metric",
        "is present only where it applies (`val/*` at validation steps, `train/kl` with a KL",
        "term, ...). Counters marked *since start* only grow within one process. Non-finite",
        "values are written as `null`. `<name>` stands for one path segment.",
        "",
    ]
    for area in areas():
        lines += [f"## {area.name}", ""]
        if area.intro:
            lines += [re.sub(r"(?<![\w/`\[])docs/(\w+)\.md", r"[\1.md](\1.md)", area.intro), ""]
        lines += ["| metric | unit | meaning |", "|---|---|---|"]
        lines += [f"| `{d.name}` | {d.unit} | {d.meaning} |" for d in area.metrics]
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None, write: Callable[[str], Any] = sys.stdout.write) -> int:
    """``glossary [--check] [PATH]``: write (or compare) the metrics page."""
    return generated_doc_main(
        argv, prog="nexrl_async.obs.glossary", render=render, command=COMMAND, write=write
    )


if __name__ == "__main__":
    sys.exit(main())
