"""The metrics glossary (docs/metrics.md) names every metric the source spells out."""

from __future__ import annotations

import re
from pathlib import Path

import nexrl_async
from nexrl_async.obs import glossary

ROOT = Path(__file__).parents[3]
AREAS = ("rollout", "pipeline", "pool", "train", "val", "weights", "timing", "throughput", "data")
LITERAL = re.compile(r"""["'](?:""" + "|".join(AREAS) + r""")/[A-Za-z0-9_/{}<>-]+["']""")


def _source_metric_names() -> set[str]:
    """Metric names written as string literals in src (f-string fields become placeholders)."""
    names = set()
    for path in Path(nexrl_async.__file__).parent.rglob("*.py"):
        if path.name == "glossary.py":
            continue
        for literal in LITERAL.findall(path.read_text(encoding="utf-8")):
            names.add(re.sub(r"\{[^}]*\}", "x", literal.strip("\"'")))
    # ``f"train/{k}"``: a whole leaf from a dict of the loss; real runs check those names
    return {n for n in names if not re.fullmatch(r"[a-z]+/x", n)}


def test_every_metric_named_in_the_source_is_in_the_glossary() -> None:
    names = _source_metric_names()
    assert "train/grad_norm" in names  # the scan finds what it should
    assert "rollout/failed/x" in names
    missing = sorted(n for n in names - glossary.NOT_LOGGED if glossary.describe(n) is None)
    assert not missing, (
        f"metrics without a glossary entry: {missing}; add them to "
        f"src/nexrl_async/obs/glossary.toml and run `{glossary.COMMAND}`"
    )


def test_placeholders_match_one_segment_and_exact_names_win() -> None:
    assert glossary.describe("rollout/exact_mean").name == "rollout/<metric>_mean"
    assert glossary.describe("rollout/reward_mean").name == "rollout/reward_mean"
    assert glossary.describe("rollout/failed/timeout").name == "rollout/failed/<reason>"
    assert glossary.describe("rollout/failed/a/b") is None
    assert glossary.describe("train/nonsense") is None


def test_docs_metrics_md_is_up_to_date() -> None:
    doc = ROOT / "docs" / "metrics.md"
    assert doc.read_text(encoding="utf-8") == glossary.render(), (
        f"docs/metrics.md is stale: regenerate it with `{glossary.COMMAND}`"
    )


def test_every_entry_has_a_unit_and_a_meaning_and_is_unique() -> None:
    docs = glossary.entries()
    assert len({d.name for d in docs}) == len(docs)
    assert all(d.unit and d.meaning.endswith(".") for d in docs)
