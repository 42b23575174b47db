"""Field mapping (``{our_name: column}``) and the required-fields check.

Mapping renames: a mapped column appears under our name only; every other column keeps its
name. Two of our names may map to the same column. A column that is mapped but absent from a
row leaves our name absent from that item.

Missing fields are data, not exceptions: an item lacking a required field is still handed out,
and the rollout worker fails its group as ``FailureReason.BAD_ITEM`` after asking
:func:`missing_fields`. A field whose value is ``None`` counts as missing, since columnar
sources (parquet, HF datasets) fill absent cells with null.

One check does raise, at open time: a mapped column or a required field that *no* row has is a
typo in the recipe, not a bad row, and would fail every item of the run.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from nexrl_async.core.errors import DataError
from nexrl_async.core.records import DataItem

Row = dict[str, Any]


def map_fields(row: Mapping[str, Any], mapping: Mapping[str, str]) -> Row:
    """``row`` with mapped columns renamed to our names (other columns unchanged)."""
    if not mapping:
        return dict(row)
    mapped_columns = set(mapping.values())
    out = {key: value for key, value in row.items() if key not in mapped_columns}
    for ours, column in mapping.items():
        if column in row:
            out[ours] = row[column]
    return out


def missing_fields(item: DataItem | Mapping[str, Any], required: Sequence[str]) -> list[str]:
    """The ``required`` fields ``item`` lacks (absent or ``None``), in ``required`` order."""
    fields = item.fields if isinstance(item, DataItem) else item
    return [name for name in required if fields.get(name) is None]


def check_mapping(
    rows: Sequence[Mapping[str, Any]], mapping: Mapping[str, str], where: str
) -> None:
    """Raise :class:`DataError` if a mapped column has a value in no row (raw rows)."""
    if not rows or not mapping:
        return
    present = _present_columns(rows)
    for ours, column in mapping.items():
        if column not in present:
            raise DataError(
                f"{where}: fields.{ours} = {column!r}, but no row has a value for column "
                f"{column!r}; columns are {sorted(present)}"
            )


def check_required(rows: Sequence[Mapping[str, Any]], required: Sequence[str], where: str) -> None:
    """Raise :class:`DataError` if a required field has a value in no row (mapped rows)."""
    if not rows or not required:
        return
    present = _present_columns(rows)
    for name in required:
        if name not in present:
            raise DataError(
                f"{where}: required field {name!r} has a value in no row; "
                f"fields are {sorted(present)}"
            )


def _present_columns(rows: Sequence[Mapping[str, Any]]) -> set[str]:
    """Columns that hold a non-null value in at least one row."""
    present: set[str] = set()
    for row in rows:
        present.update(key for key, value in row.items() if value is not None)
    return present
