"""Recipe section ``[data]`` (and ``[validation.data]``): where items come from.

One source (``kind`` = ``jsonl``, ``parquet``, ``hf_disk``, ``hf``, ``python``) or a weighted
``mixture`` of them (``[[data.sources]]``, each a full source spec with a ``name`` and a
``weight``). docs/data.md describes every kind, the mixture's draw and its exhaustion rule.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Annotated, Literal

from msgspec import Meta, Struct

from nexrl_async.config.types import NonNegInt, PathStr, PosInt, RefStr

SourceName = Annotated[
    str,
    Meta(
        pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$",
        max_length=64,
        description="letters, digits, '_', '.', '-' (it becomes part of item keys and metrics)",
    ),
]
"""A source's name: in its items' keys (``<name>/<epoch>:<row>``) and metrics (``data/<name>/``)."""

HubId = Annotated[
    str,
    Meta(
        pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*(/[A-Za-z0-9][A-Za-z0-9_.-]*)?$",
        description="a Hugging Face Hub dataset id: 'name' or 'namespace/name'",
    ),
]
"""A Hugging Face Hub dataset id, ``name`` or ``namespace/name``."""

Weight = Annotated[float, Meta(gt=0.0, le=1e6)]
"""A relative draw weight: positive and finite (at most 1e6)."""

MAX_REPLAYS = 2
"""Default of ``max_replays``."""


class _DataCommon(Struct, frozen=True, kw_only=True, forbid_unknown_fields=True, tag_field="kind"):
    fields: dict[str, str] = {}
    """Field mapping ``{our_name = "column"}``; unmapped columns keep their names."""
    required: list[str] = []
    """Fields (after mapping) every item must have; items lacking one fail as ``bad_item``. In
    a mixture this belongs to ``[data]`` (it applies to every source's items)."""
    shuffle: bool = True
    """Shuffle each epoch with ``seed + epoch``."""
    seed: int = 0
    """Shuffle seed."""
    epochs: PosInt = 1
    """Passes over the data; the run ends when they are exhausted (unless total_steps first)."""
    max_items: NonNegInt | None = None
    """Use only the first N rows (before shuffling)."""
    max_replays: NonNegInt = MAX_REPLAYS
    """Times an item whose group failed is handed out again; after that it is skipped and
    counted (``pipeline/abandoned_items``). Groups dropped as overdue always replay. In a
    mixture this belongs to ``[data]``."""
    name: SourceName | None = None
    """Names the source: its item keys become ``<name>/<epoch>:<row>`` and the step metrics
    get ``data/<name>/...``. Required for every source of a mixture, optional elsewhere."""
    weight: Weight = 1.0
    """Relative draw weight of this source in a mixture (``[[data.sources]]`` only)."""
    evaluator: RefStr | None = None
    """``file.py:Name`` scoring this source's items instead of ``rollout.evaluator``
    (``[[data.sources]]`` only)."""


class JsonlData(_DataCommon, frozen=True, kw_only=True, tag="jsonl"):
    """One JSON object per line."""

    path: PathStr
    """The .jsonl file."""


class ParquetData(_DataCommon, frozen=True, kw_only=True, tag="parquet"):
    """A parquet file."""

    path: PathStr
    """The .parquet file."""


class HFDiskData(_DataCommon, frozen=True, kw_only=True, tag="hf_disk"):
    """A folder written by ``datasets.Dataset.save_to_disk`` (needs the ``datasets`` package)."""

    path: PathStr
    """The dataset folder."""
    split: str | None = None
    """Split to read when the folder holds a DatasetDict."""


class HFData(_DataCommon, frozen=True, kw_only=True, tag="hf"):
    """A Hugging Face Hub dataset by name, read from the local cache only (never the network).

    ``datasets.load_dataset(dataset, subset, split=...)`` runs in offline mode against the
    cache ``load_dataset`` filled when the dataset was downloaded once (docs/data.md).
    """

    dataset: HubId
    """The Hub dataset id, e.g. ``"openai/gsm8k"``."""
    subset: str | None = None
    """The dataset's configuration (the Hub's "subset", ``load_dataset``'s ``name``), e.g.
    ``"main"``; needed when the cache holds several."""
    split: str | None = None
    """Split to read; may be omitted when the dataset has one split."""
    cache_dir: PathStr | None = None
    """The datasets cache to read; default ``$HF_DATASETS_CACHE``, else ``$HF_HOME/datasets``,
    else ``~/.cache/huggingface/datasets``."""


class PythonData(_DataCommon, frozen=True, kw_only=True, tag="python"):
    """Rows returned by a Python factory ``file.py:function`` (called with ``**kwargs``)."""

    factory: RefStr
    """``file.py:function`` returning an iterable of dicts."""
    kwargs: dict[str, str | int | float | bool] = {}
    """Keyword arguments passed to the factory."""


SourceConfig = JsonlData | ParquetData | HFDiskData | HFData | PythonData
"""One source of rows."""


class MixtureData(
    Struct, frozen=True, kw_only=True, forbid_unknown_fields=True, tag_field="kind", tag="mixture"
):
    """Several sources drawn by weight: each new item comes from source ``i`` with probability
    ``weight_i / sum(weights)`` (a seeded draw; the cursor resumes exactly)."""

    sources: Annotated[list[SourceConfig], Meta(min_length=1)]
    """``[[data.sources]]``: each a full source spec with a unique ``name`` and a ``weight``."""
    seed: int = 0
    """Seed of the weighted draw (each source shuffles with its own ``seed``)."""
    exhaustion: Literal["stop", "rest"] = "stop"
    """``stop``: the mixture ends when a draw picks a source with nothing left (the weights hold
    to the end); ``rest``: a source that ran out leaves the draw and the rest go on, with their
    weights renormalised, until every source is exhausted."""
    required: list[str] = []
    """Fields (after each source's mapping) every item must have; items lacking one fail as
    ``bad_item``."""
    max_replays: NonNegInt = MAX_REPLAYS
    """Times an item whose group failed is handed out again (see the single-source field)."""


DataConfig = SourceConfig | MixtureData
"""``[data]``: one source or a mixture."""


def sources_of(prefix: str, cfg: DataConfig) -> Iterator[tuple[str, SourceConfig]]:
    """``(dotted path, source)`` for ``cfg`` itself or, for a mixture, each of its sources."""
    if isinstance(cfg, MixtureData):
        for i, source in enumerate(cfg.sources):
            yield f"{prefix}.sources.{i}", source
    else:
        yield prefix, cfg


def data_problems(prefix: str, cfg: DataConfig) -> list[tuple[str, str]]:
    """``(dotted path, message)`` for the rules of ``[data]`` no single field expresses.

    ``prefix`` is where ``cfg`` sits in the recipe (``data``, ``validation.data``).
    """
    if not isinstance(cfg, MixtureData):
        where = f'{prefix}.kind = "mixture", [[{prefix}.sources]]'
        if cfg.evaluator is not None:
            why = f"a single source is scored by rollout.evaluator; per-source ones are for {where}"
            return [(f"{prefix}.evaluator", f"{prefix}.evaluator = {cfg.evaluator!r}: {why}")]
        if cfg.weight != 1.0:
            why = f"only the sources of a mixture have weights ({where})"
            return [(f"{prefix}.weight", f"{prefix}.weight = {cfg.weight}: {why}")]
        return []
    problems: list[tuple[str, str]] = []
    seen: dict[str, int] = {}
    for i, source in enumerate(cfg.sources):
        at = f"{prefix}.sources.{i}"
        if source.name is None:
            why = "every source of a mixture needs one (its metrics are data/<name>/...)"
            problems.append((f"{at}.name", f"{at}.name is required: {why}"))
        elif source.name in seen:
            other = f"{prefix}.sources.{seen[source.name]}"
            problems.append((f"{at}.name", f"{at}.name = {source.name!r}: {other} has it too"))
        else:
            seen[source.name] = i
        if source.required:
            why = f"set required on [{prefix}], the mixture: it applies to every source's items"
            problems.append((f"{at}.required", f"{at}.required = {source.required}: {why}"))
        if source.max_replays != MAX_REPLAYS:
            why = f"set max_replays on [{prefix}], the mixture"
            problems.append(
                (f"{at}.max_replays", f"{at}.max_replays = {source.max_replays}: {why}")
            )
    return problems


def source_evaluators(
    cfg: DataConfig | None, fallback: Mapping[str, str] | None = None
) -> dict[str, str]:
    """``{source name: evaluator ref}`` for the sources of a mixture that name one; a source
    that does not takes the ``fallback`` of its name (validation falls back on training's)."""
    if not isinstance(cfg, MixtureData):
        return {}
    out: dict[str, str] = {}
    for source in cfg.sources:
        ref = source.evaluator or (fallback or {}).get(source.name or "")
        if ref is not None and source.name is not None:
            out[source.name] = ref
    return out
