"""The in-memory, resumable data source every recipe ``[data]`` kind opens into.

Order of hand-out: items queued by :meth:`RowSource.replay` first (FIFO), then the next row of
the current epoch. Epoch ``e`` visits every row once, in file order or, with ``shuffle``, in the
permutation ``random.Random(seed + e)`` makes of the row indices. After ``epochs`` passes the
source is exhausted and :meth:`RowSource.next_item` returns ``None`` (a later ``replay`` makes
it non-empty again).

Keys: an item's key is ``f"{epoch}:{row_index}"`` where ``row_index`` is its position in the
file (after ``max_items``), so keys are stable across resumes and reshuffles. A named source
(``name``, always in a mixture) prefixes it: ``f"{name}/{epoch}:{row_index}"``.

Cursor: the permutation of an epoch is a pure function of ``(seed, epoch, rows)``, so the state
is just ``epoch``, ``position`` in that epoch and the replay queue as keys. Restoring it into a
source opened from the same config continues with exactly the items the uninterrupted source
would have handed out. Rows themselves are never in the state: they are re-read at open time.
"""

from __future__ import annotations

import random
from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from loguru import logger

from nexrl_async.config.data import DataConfig, HFData, MixtureData, PythonData, SourceConfig
from nexrl_async.core.errors import DataError
from nexrl_async.core.records import DataItem
from nexrl_async.data.fields import check_mapping, check_required, map_fields, missing_fields
from nexrl_async.data.hub import describe_hf
from nexrl_async.data.mixture import MixtureSource
from nexrl_async.data.readers import Row, read_rows, resolve_path

STATE_FORMAT = 1
"""Version of :meth:`RowSource.state_dict` 's layout."""


class RowSource:
    """A finite sequence of rows served as :class:`DataItem` s over epochs, with replay.

    Implements :class:`nexrl_async.core.protocols.DataSource`. Synchronous and O(1) per call;
    not thread-safe (the engine calls it from the event loop only).
    """

    def __init__(
        self,
        rows: Sequence[Row],
        *,
        shuffle: bool = False,
        seed: int = 0,
        epochs: int = 1,
        required: Sequence[str] = (),
        name: str | None = None,
    ) -> None:
        if epochs < 1:
            raise DataError(f"epochs must be >= 1, got {epochs}")
        self._rows = list(rows)
        self._shuffle = shuffle
        self._seed = seed
        self._epochs = epochs
        self._required = tuple(required)
        self._name = name
        self._prefix = f"{name}/" if name else ""
        self._epoch = 0
        self._position = 0
        self._replay: deque[tuple[int, int]] = deque()
        self._order_cache: tuple[int, list[int]] | None = None

    def __len__(self) -> int:
        """Rows per epoch."""
        return len(self._rows)

    @property
    def name(self) -> str | None:
        """The source's name (the prefix of its keys), ``None`` when unnamed."""
        return self._name

    @property
    def epochs(self) -> int:
        return self._epochs

    @property
    def epoch(self) -> int:
        """The epoch new (non-replayed) items come from; equals ``epochs`` once all are done."""
        return self._epoch

    @property
    def position(self) -> int:
        """How many rows of the current epoch have been handed out."""
        return self._position

    @property
    def pending_replays(self) -> int:
        return len(self._replay)

    @property
    def required(self) -> tuple[str, ...]:
        return self._required

    @property
    def exhausted(self) -> bool:
        """No replay is queued and every epoch has been handed out."""
        return not self._replay and self._epochs_done()

    def _epochs_done(self) -> bool:
        return self._epoch >= self._epochs or not self._rows

    def next_item(self) -> DataItem | None:
        """A queued replay, else the next row of the current epoch, else ``None``."""
        if self._replay:
            epoch, index = self._replay.popleft()
            return self.item_at(epoch, index)
        if self._epochs_done():
            return None
        index = self.order(self._epoch)[self._position]
        item = self.item_at(self._epoch, index)
        self._position += 1
        if self._position == len(self._rows):
            self._epoch += 1
            self._position = 0
        return item

    def replay(self, item: DataItem) -> None:
        """Queue ``item`` to be handed out again, after earlier replays, before new rows."""
        self._replay.append(self.parse_key(item.key))

    def missing_fields(self, item: DataItem) -> list[str]:
        """The required fields ``item`` lacks; non-empty means the worker fails it as bad_item."""
        return missing_fields(item, self._required)

    def order(self, epoch: int) -> list[int]:
        """Row indices in the order epoch ``epoch`` visits them."""
        if self._order_cache is not None and self._order_cache[0] == epoch:
            return self._order_cache[1]
        order = list(range(len(self._rows)))
        if self._shuffle:
            random.Random(self._seed + epoch).shuffle(order)
        self._order_cache = (epoch, order)
        return order

    def state_dict(self, in_flight: Iterable[DataItem] = ()) -> dict[str, Any]:
        """The cursor as plain types (msgpack/JSON-able).

        ``in_flight``: items handed out whose groups are not finished yet. A checkpoint taken
        while they run would otherwise lose them; they are saved as replays queued after the
        current replay queue (the live source is not changed).
        """
        queued = [*self._replay, *(self.parse_key(item.key) for item in in_flight)]
        replay = [self.key(epoch, index) for epoch, index in queued]
        return {
            "format": STATE_FORMAT,
            "rows": len(self._rows),
            "epoch": self._epoch,
            "position": self._position,
            "replay": replay,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue from ``state`` (from :meth:`state_dict` of a source over the same rows)."""
        fmt, rows = state.get("format"), state.get("rows")
        if fmt != STATE_FORMAT:
            raise DataError(f"data cursor format {fmt!r} is not {STATE_FORMAT}")
        if rows != len(self._rows):
            raise DataError(
                f"data cursor was saved for {rows} rows but the source now has "
                f"{len(self._rows)}; the dataset changed since the checkpoint"
            )
        epoch, position = _cursor_int(state, "epoch"), _cursor_int(state, "position")
        if position >= max(len(self._rows), 1):
            raise DataError(f"data cursor position {position} is past {len(self._rows)} rows")
        replay = state.get("replay")
        if not isinstance(replay, list) or not all(isinstance(k, str) for k in replay):
            raise DataError(f"data cursor replay must be a list of keys, got {replay!r}")
        parsed = [self.parse_key(key) for key in replay]
        self._epoch, self._position = epoch, position
        self._replay = deque(parsed)

    def metrics(self) -> dict[str, float]:
        """A named source's progress: ``data/<name>/drawn`` (new items handed out so far, over
        all epochs) and ``data/<name>/epoch``; nothing for an unnamed one."""
        if self._name is None:
            return {}
        drawn = self._epoch * len(self._rows) + self._position
        return {f"data/{self._name}/drawn": float(drawn), f"data/{self._name}/epoch": self._epoch}

    def key(self, epoch: int, index: int) -> str:
        """The key of row ``index`` in epoch ``epoch``."""
        return f"{self._prefix}{epoch}:{index}"

    def item_at(self, epoch: int, index: int) -> DataItem:
        """Row ``index`` as the item of epoch ``epoch``."""
        fields = dict(self._rows[index])
        return DataItem(key=self.key(epoch, index), index=index, epoch=epoch, fields=fields)

    def parse_key(self, key: str) -> tuple[int, int]:
        """``(epoch, row)`` of one of this source's keys; :class:`DataError` for any other."""
        if not key.startswith(self._prefix):
            raise DataError(f"data item key {key!r} is not from source {self._name!r}")
        epoch_text, sep, index_text = key[len(self._prefix) :].partition(":")
        if not (sep and epoch_text.isdigit() and index_text.isdigit()):
            form = f"{self._prefix}<epoch>:<row>"
            raise DataError(f"data item key {key!r} is not of the form {form!r}")
        epoch, index = int(epoch_text), int(index_text)
        if index >= len(self._rows):
            raise DataError(f"data item key {key!r} names row {index} of {len(self._rows)}")
        return epoch, index


def _cursor_int(state: Mapping[str, Any], name: str) -> int:
    value = state.get(name)
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise DataError(f"data cursor {name} must be an integer >= 0, got {value!r}")
    return value


def open_source(cfg: DataConfig, *, base_dir: Path) -> RowSource | MixtureSource:
    """Read and check the rows ``cfg`` names, and wrap them in a fresh source (a
    :class:`MixtureSource` of one :class:`RowSource` per source for a mixture).

    Blocking file IO: from async code call it via ``anyio.to_thread.run_sync``. Relative paths
    in ``cfg`` resolve against ``base_dir`` (the recipe's folder).
    """
    if isinstance(cfg, MixtureData):
        members = [_open_one(s, base_dir, required=cfg.required) for s in cfg.sources]
        weights = [s.weight for s in cfg.sources]
        total = sum(weights)
        logger.info(
            "data: mixture of {} (seed={}, exhaustion={})",
            ", ".join(
                f"{s.name} {w / total:.1%}" for s, w in zip(cfg.sources, weights, strict=True)
            ),
            cfg.seed,
            cfg.exhaustion,
        )
        return MixtureSource(members, weights, seed=cfg.seed, exhaustion=cfg.exhaustion)
    return _open_one(cfg, base_dir, required=cfg.required)


def _open_one(cfg: SourceConfig, base_dir: Path, *, required: Sequence[str]) -> RowSource:
    rows = load_rows(cfg, base_dir, required=required)
    logger.info(
        "data: {} rows from {} (epochs={}, shuffle={}, seed={})",
        len(rows),
        describe(cfg, base_dir),
        cfg.epochs,
        cfg.shuffle,
        cfg.seed,
    )
    return RowSource(
        rows,
        shuffle=cfg.shuffle,
        seed=cfg.seed,
        epochs=cfg.epochs,
        required=required,
        name=cfg.name,
    )


def iterate_once(
    cfg: DataConfig,
    base_dir: Path,
    max_items: int | None = None,
    *,
    shuffle: bool = False,
) -> list[DataItem]:
    """One pass over the source as items of epoch 0, for validation.

    File order unless ``shuffle`` (then the epoch-0 permutation of the source's ``seed``; its
    ``shuffle`` and ``epochs`` are ignored). A mixture gives each source's pass in turn, in the
    order of ``sources`` (weights are ignored). ``max_items`` caps the result after each
    source's own ``max_items``.
    """
    if max_items is not None and max_items < 0:
        raise DataError(f"max_items must be >= 0, got {max_items}")
    if isinstance(cfg, MixtureData):
        members = [(s, cfg.required) for s in cfg.sources]
    else:
        members = [(cfg, cfg.required)]
    items: list[DataItem] = []
    for member, required in members:
        rows = load_rows(member, base_dir, required=required)
        source = RowSource(rows, shuffle=shuffle, seed=member.seed, name=member.name)
        items.extend(source.item_at(0, index) for index in source.order(0))
    return items if max_items is None else items[:max_items]


def load_rows(
    cfg: SourceConfig, base_dir: Path, *, required: Sequence[str] | None = None
) -> list[Row]:
    """The source's rows after ``max_items`` and field mapping, with the open-time checks
    (``required`` replaces ``cfg.required``: a mixture's applies to each of its sources)."""
    where = describe(cfg, base_dir)
    raw = read_rows(cfg, base_dir)
    if not raw and cfg.max_items != 0:
        raise DataError(f"{where}: the source has no rows")
    check_mapping(raw, cfg.fields, where)
    rows = [map_fields(row, cfg.fields) for row in raw]
    check_required(rows, cfg.required if required is None else required, where)
    return rows


def describe(cfg: SourceConfig, base_dir: Path) -> str:
    """What a log line or error calls the source: its file, dataset or factory ref."""
    named = f"source {cfg.name!r}: " if cfg.name else ""
    if isinstance(cfg, PythonData):
        return f"{named}data factory {cfg.factory!r}"
    if isinstance(cfg, HFData):
        return named + describe_hf(cfg)
    return named + str(resolve_path(cfg.path, base_dir))
