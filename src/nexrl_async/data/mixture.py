"""A weighted mixture of named sources with one exact, resumable cursor.

Draw. New item ``n`` (``n`` = 0, 1, ... counts the mixture's draws) comes from source ``i``
with probability ``weight_i / sum(weights)``: ``u_n`` is a uniform number in ``[0, 1)`` made
from the first 53 bits of ``blake2b(f"{seed}:{n}")``, and the source is the one whose slice of
the cumulative weights holds ``u_n * sum(weights)``. The draws are independent and each is a
pure function of ``(seed, n)`` and which sources are still drawn, so the cursor is just ``n``
plus each source's own cursor. Within a source, items come in that source's order (its own
shuffle, seed and epochs: :class:`~nexrl_async.data.source.RowSource`).

Exhaustion (``exhaustion``):

- ``stop``: every source stays in the draw; the mixture is exhausted as soon as draw ``n``
  picks a source with nothing left (``n`` does not advance, so it stays exhausted). The weights
  hold to the end; the first source to run out ends the mixture, like the shortest epoch.
- ``rest``: a source with nothing left leaves the draw, and the others are drawn with their
  weights renormalised; the mixture is exhausted when every source is. Every row of every
  source is handed out ``epochs`` times (that source's ``epochs``). To oversample a small
  source, raise its ``epochs``.

Replay. :meth:`MixtureSource.replay` queues an item in the mixture's own FIFO queue; queued
items are handed out before any new draw and do not count as draws. Keys are
``<source>/<epoch>:<row>``, so a replayed (or checkpointed) item finds its source again.

State: ``{"format", "draws", "sources": {name: that source's cursor}, "replay": [keys]}``.
Restoring it into a mixture opened from the same config continues with exactly the items the
uninterrupted mixture would have handed out.
"""

from __future__ import annotations

import hashlib
import math
from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Literal

from nexrl_async.core.errors import DataError
from nexrl_async.core.records import DataItem

if TYPE_CHECKING:  # the source module builds mixtures: a runtime import would be circular
    from nexrl_async.data.source import RowSource

MIXTURE_FORMAT = 1
"""Version of :meth:`MixtureSource.state_dict` 's layout."""

_UNIT = float(1 << 53)


def draw_uniform(seed: int, n: int) -> float:
    """The uniform number in ``[0, 1)`` that decides draw ``n`` of a mixture seeded ``seed``."""
    digest = hashlib.blake2b(f"{seed}:{n}".encode(), digest_size=8).digest()
    return (int.from_bytes(digest, "big") >> 11) / _UNIT


def source_of(key: str) -> str | None:
    """The source name in an item key ``<name>/<epoch>:<row>``; ``None`` for an unnamed key."""
    name, sep, _ = key.partition("/")
    return name if sep else None


class MixtureSource:
    """Named :class:`RowSource` s drawn by weight; see the module docstring.

    Implements :class:`nexrl_async.core.protocols.DataSource`. Synchronous, O(sources) per
    call; not thread-safe (the engine calls it from the event loop only).
    """

    def __init__(
        self,
        sources: Sequence[RowSource],
        weights: Sequence[float],
        *,
        seed: int = 0,
        exhaustion: Literal["stop", "rest"] = "stop",
    ) -> None:
        names = [source.name for source in sources]
        if not sources or len(weights) != len(sources):
            raise DataError(f"a mixture needs one weight per source, got {len(weights)} weights")
        if None in names or len(set(names)) != len(names):
            raise DataError(f"the sources of a mixture need unique names, got {names}")
        if not all(0 < w < math.inf for w in weights):
            raise DataError(f"mixture weights must be > 0 and finite, got {list(weights)}")
        self._sources = list(sources)
        self._names: list[str] = [str(name) for name in names]
        self._weights = [float(w) for w in weights]
        self._seed = seed
        self._exhaustion = exhaustion
        self._draws = 0
        self._replay: deque[tuple[int, int, int]] = deque()

    @property
    def names(self) -> list[str]:
        return list(self._names)

    @property
    def draws(self) -> int:
        """New items handed out so far (replays are not draws)."""
        return self._draws

    @property
    def pending_replays(self) -> int:
        return len(self._replay)

    @property
    def exhausted(self) -> bool:
        """No replay is queued and the next draw finds nothing (see the module docstring)."""
        return not self._replay and self._pick() is None

    def next_item(self) -> DataItem | None:
        """A queued replay, else the next item of the source draw ``n`` picks, else ``None``."""
        if self._replay:
            source, epoch, index = self._replay.popleft()
            return self._sources[source].item_at(epoch, index)
        picked = self._pick()
        if picked is None:
            return None
        item = self._sources[picked].next_item()
        assert item is not None  # _pick only returns a source with items left
        self._draws += 1
        return item

    def replay(self, item: DataItem) -> None:
        """Queue ``item`` to be handed out again, after earlier replays, before new draws."""
        self._replay.append(self._locate(item.key))

    def metrics(self) -> dict[str, float]:
        """Per source: ``data/<name>/drawn`` and ``data/<name>/epoch``; ``data/draws``."""
        out: dict[str, float] = {"data/draws": float(self._draws)}
        for source in self._sources:
            out.update(source.metrics())
        return out

    def state_dict(self, in_flight: Iterable[DataItem] = ()) -> dict[str, Any]:
        """The cursor as plain types; ``in_flight`` items are saved as replays queued after the
        current queue (the live mixture is not changed)."""
        queued = [*self._replay, *(self._locate(item.key) for item in in_flight)]
        return {
            "format": MIXTURE_FORMAT,
            "draws": self._draws,
            "sources": {n: s.state_dict() for n, s in zip(self._names, self._sources, strict=True)},
            "replay": [self._sources[s].key(epoch, index) for s, epoch, index in queued],
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue from ``state`` (from :meth:`state_dict` of a mixture of the same sources)."""
        if state.get("format") != MIXTURE_FORMAT:
            raise DataError(
                f"mixture cursor format {state.get('format')!r} is not {MIXTURE_FORMAT}"
            )
        draws, cursors, replay = state.get("draws"), state.get("sources"), state.get("replay")
        if not isinstance(draws, int) or isinstance(draws, bool) or draws < 0:
            raise DataError(f"mixture cursor draws must be an integer >= 0, got {draws!r}")
        if not isinstance(cursors, Mapping) or sorted(cursors) != sorted(self._names):
            saved = sorted(cursors) if isinstance(cursors, Mapping) else cursors
            raise DataError(
                f"mixture cursor was saved for sources {saved}, the recipe has {self._names}"
            )
        if not isinstance(replay, list) or not all(isinstance(k, str) for k in replay):
            raise DataError(f"mixture cursor replay must be a list of keys, got {replay!r}")
        parsed = [self._locate(key) for key in replay]
        for name, source in zip(self._names, self._sources, strict=True):
            source.load_state_dict(cursors[name])
        self._draws = draws
        self._replay = deque(parsed)

    def _pick(self) -> int | None:
        """The source draw ``self._draws`` takes from, or ``None`` when the mixture is done."""
        live = [i for i, source in enumerate(self._sources) if not source.exhausted]
        drawn = live if self._exhaustion == "rest" else list(range(len(self._sources)))
        if not drawn:
            return None
        target = draw_uniform(self._seed, self._draws) * sum(self._weights[i] for i in drawn)
        picked, total = drawn[-1], 0.0
        for i in drawn:
            total += self._weights[i]
            if target < total:
                picked = i
                break
        return picked if picked in live else None

    def _locate(self, key: str) -> tuple[int, int, int]:
        """``(source, epoch, row)`` of a key ``<name>/<epoch>:<row>``."""
        name = source_of(key)
        if name is None or name not in self._names:
            raise DataError(f"data item key {key!r} names none of the sources {self._names}")
        source = self._names.index(name)
        epoch, index = self._sources[source].parse_key(key)
        return source, epoch, index
