"""Readers: turn one source config into a list of rows (``dict`` s keyed by column name).

Every reader loads the whole source into memory once, at open time. That is the right trade for
RL prompt sets (thousands to a few hundred thousand short rows) and it makes the cursor trivial:
an item is its row index. Readers do blocking file IO: call them (or
:func:`~nexrl_async.data.source.open_source`) from a worker thread, not the event loop.

Error policy: anything that makes the *file* unreadable is a :class:`DataError` raised here,
naming the file (and line, for jsonl). A jsonl line that is not valid JSON, or is valid JSON but
not an object, is such an error: a syntactically broken file is a broken or truncated dataset,
and finding out before any GPU time is spent beats failing its rows one by one mid-run. A row
that parses but lacks a *required field* is not an error here; see
:func:`~nexrl_async.data.fields.missing_fields`.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import msgspec
from loguru import logger

from nexrl_async.config.data import (
    HFData,
    HFDiskData,
    JsonlData,
    ParquetData,
    PythonData,
    SourceConfig,
)
from nexrl_async.core.errors import DataError
from nexrl_async.core.usercode import load_object
from nexrl_async.data.hub import read_hf

Row = dict[str, Any]


def resolve_path(path: str, base_dir: Path) -> Path:
    """``path`` itself when absolute, else ``base_dir / path``."""
    candidate = Path(path).expanduser()
    return candidate if candidate.is_absolute() else base_dir / candidate


def read_rows(cfg: SourceConfig, base_dir: Path) -> list[Row]:
    """All rows of the source ``cfg`` names (the first ``cfg.max_items`` if set), in file order."""
    limit = cfg.max_items
    if isinstance(cfg, JsonlData):
        rows = read_jsonl(resolve_path(cfg.path, base_dir), limit)
    elif isinstance(cfg, ParquetData):
        rows = read_parquet(resolve_path(cfg.path, base_dir), limit)
    elif isinstance(cfg, HFDiskData):
        rows = read_hf_disk(resolve_path(cfg.path, base_dir), cfg.split, limit)
    elif isinstance(cfg, HFData):
        rows = read_hf(cfg, limit)
    elif isinstance(cfg, PythonData):
        rows = read_factory(cfg.factory, cfg.kwargs, base_dir, limit)
    else:  # pragma: no cover - the union is closed; this guards future variants
        raise DataError(f"unknown data source kind {type(cfg).__name__}")
    return rows


def _require_file(path: Path, what: str) -> None:
    if not path.exists():
        raise DataError(f"{what} {path} does not exist")
    if not path.is_file():
        raise DataError(f"{what} {path} is not a file")


def read_jsonl(path: Path, limit: int | None = None) -> list[Row]:
    """One JSON object per line; blank lines are skipped. Errors name ``file:line``."""
    _require_file(path, "jsonl file")
    decoder = msgspec.json.Decoder()
    rows: list[Row] = []
    try:
        with path.open("rb") as stream:
            for line_no, line in enumerate(stream, start=1):
                if limit is not None and len(rows) >= limit:
                    break
                if not line.strip():
                    continue
                rows.append(_decode_line(decoder, line, path, line_no))
    except OSError as err:
        raise DataError(f"cannot read {path}: {err}") from err
    return rows


def _decode_line(decoder: msgspec.json.Decoder[Any], line: bytes, path: Path, line_no: int) -> Row:
    try:
        value = decoder.decode(line)
    except msgspec.DecodeError as err:
        raise DataError(f"{path}:{line_no}: invalid JSON: {err}") from err
    if not isinstance(value, dict):
        kind = "an array" if isinstance(value, list) else type(value).__name__
        raise DataError(f"{path}:{line_no}: expected a JSON object per line, got {kind}")
    return value


def read_parquet(path: Path, limit: int | None = None) -> list[Row]:
    """A parquet file, through pyarrow."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    _require_file(path, "parquet file")
    try:
        table = pq.read_table(path)
    except (OSError, pa.ArrowException) as err:
        raise DataError(f"cannot read parquet file {path}: {err}") from err
    if limit is not None:
        table = table.slice(0, limit)
    rows: list[Row] = table.to_pylist()
    return rows


def read_hf_disk(path: Path, split: str | None, limit: int | None = None) -> list[Row]:
    """A folder written by ``Dataset.save_to_disk`` or ``DatasetDict.save_to_disk``."""
    try:
        import datasets
    except ImportError as err:
        raise DataError(
            "kind = 'hf_disk' needs the `datasets` package: pip install 'nexrl-async[datasets]'"
        ) from err
    if not path.is_dir():
        raise DataError(f"HF dataset folder {path} does not exist or is not a folder")
    try:
        loaded = datasets.load_from_disk(str(path))
    except (OSError, ValueError) as err:
        raise DataError(f"cannot load HF dataset from {path}: {err}") from err
    dataset = _pick_split(loaded, path, split)
    if limit is not None:
        dataset = dataset.select(range(min(limit, len(dataset))))
    rows: list[Row] = dataset.to_list()
    return rows


def _pick_split(loaded: Any, path: Path, split: str | None) -> Any:
    """The Dataset to read from what ``load_from_disk`` returned."""
    splits: list[str] | None = list(loaded.keys()) if hasattr(loaded, "keys") else None
    if splits is None:
        if split is not None:
            raise DataError(
                f"{path} holds a single Dataset, not a DatasetDict: remove split = {split!r}"
            )
        return loaded
    if split is None:
        if len(splits) == 1:
            logger.info("data: {} has one split, {!r}; reading it", path, splits[0])
            return loaded[splits[0]]
        raise DataError(f"{path} holds a DatasetDict with splits {splits}: set split")
    if split not in splits:
        raise DataError(f"{path} has no split {split!r}; its splits are {splits}")
    return loaded[split]


MAX_FACTORY_ROWS = 1_000_000
"""Rows drawn from a data factory when ``data.max_items`` is unset (rows are held in memory)."""


def read_factory(
    ref: str,
    kwargs: Mapping[str, Any],
    base_dir: Path,
    limit: int | None = None,
) -> list[Row]:
    """Rows from a user factory ``file.py:function`` called with ``**kwargs``.

    The factory may return any iterable (a generator too, even an endless one when
    ``max_items`` is set: only the first ``limit`` rows are drawn). Without ``max_items`` at
    most :data:`MAX_FACTORY_ROWS` rows are drawn; a factory that yields more is refused (set
    ``data.max_items``) rather than filling memory. Each row must be a mapping with string keys.
    """
    factory = load_object(ref, base_dir)
    if not callable(factory):
        raise DataError(f"data factory {ref!r} is not callable (got {type(factory).__name__})")
    try:
        produced = factory(**kwargs)
        if not isinstance(produced, Iterable):
            raise DataError(
                f"data factory {ref!r} returned {type(produced).__name__}, not an iterable of dicts"
            )
        cap = MAX_FACTORY_ROWS if limit is None else limit
        drawn = list(itertools.islice(produced, cap + (limit is None)))
        if limit is None and len(drawn) > MAX_FACTORY_ROWS:
            raise DataError(
                f"data factory {ref!r} yields more than {MAX_FACTORY_ROWS:,} rows (endless?): "
                "set data.max_items to the number of rows to draw"
            )
    except DataError:
        raise
    except Exception as err:
        raise DataError(f"data factory {ref!r} raised {type(err).__name__}: {err}") from err
    return [_check_row(row, ref, index) for index, row in enumerate(drawn)]


def _check_row(row: Any, ref: str, index: int) -> Row:
    if not isinstance(row, Mapping):
        raise DataError(
            f"data factory {ref!r}: row {index} is {type(row).__name__}, expected a dict"
        )
    bad = [key for key in row if not isinstance(key, str)]
    if bad:
        raise DataError(f"data factory {ref!r}: row {index} has non-string keys {bad[:3]}")
    return dict(row)
