"""Staleness gate: version-token admission control (docs/architecture.md §3).

Pure synchronous logic:
the gate owns no tasks, locks or clients; the engine wraps it in an anyio condition and asks
again after every event that can change an answer (a lease redeemed, released or dropped, a
publication).

Vocabulary. ``B`` = ``batch_groups``, ``k`` = ``max_staleness``. Policy version ``v`` is 0 for the
initial weights; step ``s`` (0-based) consumes exactly ``B`` groups and produces version
``s + 1``; :meth:`StalenessGate.advance` is called once the fleet has loaded it. A lease issued
at version ``v`` has the *deadline* ``d = v + k`` (``VersionToken.max_step``): the last step that
may consume its group. A lease is *outstanding* from issue until it is redeemed (trained) or
released (failed, filtered, dropped). ``N`` = redeemed + outstanding is what admission counts:
a released lease gives its slot back, a redeemed one does not. ``O(t)`` = number of outstanding
leases with deadline ``<= t``.

Admission: a lease is issued only while ``N < (v + k + 1) * B`` and
``outstanding < max_inflight_groups``. ``sync`` is ``k = 0``; ``fully-async`` has no deadline
(only the in-flight cap).

Why ``on_overdue = "wait"`` bounds every consumed group (the property tests check this).
After ``n`` steps (``n * B`` redeemed) the gate keeps the invariant

    (I)   O(t) <= (t + 1 - n) * B      for every t >= n - 1

(at ``t = n - 1`` it says no outstanding lease is overdue). It holds at the start (nothing is
outstanding) and every event keeps it:

* issue at version ``v``: admission needs ``N < (v + k + 1) B``; the new lease has ``d = v + k``
  and for ``t >= d``: ``O(t) + 1 <= U + 1 = N - nB + 1 <= (v + k + 1 - n) B <= (t + 1 - n) B``
  (``U`` = outstanding). It also gives ``d >= n``: a new lease is never born overdue.
* release, drop, a group landing in the pool, a publication: ``O`` shrinks or stays.
* step ``n`` takes a set ``X`` of ``B`` groups only if
  ``O(t) - |{g in X : d_g <= t}| <= (t - n) B`` for all ``t >= n`` (:meth:`blocking_deadline`
  returns ``None``): that is (I) for ``n + 1``. Otherwise the step waits.

So a group consumed by step ``s`` has ``d >= s``. Its head version ``h`` is at least its lease
version (its tokens were generated after the lease by a fleet already at that version or
newer: the gate advances only after the fleet has loaded), hence
``s - h <= s - (d - k) <= k``. In ``sync`` (``k = 0``) also ``h <= s`` (no version above ``s``
exists before step ``s`` is consumed: :meth:`advance` refuses it), so ``h == s``: on-policy.

The wait is the least possible and always ends: the pool offers the ``B`` earliest-deadline
groups it holds, which maximises ``|{g in X : d_g <= t}|`` for every ``t`` at once, so no other
choice passes when that one fails; and once every outstanding lease has landed the check passes
(``|X ∩ {d <= t}| = min(B, O(t))`` and (I) give ``O(t) - min(B, O(t)) <= (t - n) B``). A
failing check therefore names groups still in flight (``d <= t*``): the pool admits those even
when full, so backpressure cannot deadlock the wait.

``drop`` and ``requeue`` never wait for stragglers: a step takes the ``B`` oldest groups it has;
a group found overdue is dropped (its lease released, the item replayed) or re-leased at the
current version (``requeue``: it keeps its old head version, so it alone may exceed ``k``; its
new lease's deadline still holds).
"""

from __future__ import annotations

import enum
from collections.abc import Collection, Iterable, Mapping
from typing import Any

import msgspec

from nexrl_async.config.pipeline import StalenessConfig
from nexrl_async.core.errors import CheckpointError, ConfigError
from nexrl_async.core.records import VersionToken
from nexrl_async.pipeline.gate_state import GateCounters, GateState, Mode, OverdueAction


class Fate(enum.StrEnum):
    """What happens to a finished group offered to step ``s``."""

    TRAIN = "train"
    """Within the bound: may be consumed."""
    DROP = "drop"
    """Overdue: release the lease, replay the item."""
    REQUEUE = "requeue"
    """Overdue: re-lease at the current version and keep it (head version stays old)."""


class StalenessGate:
    """Issues, tracks and retires :class:`VersionToken` leases; see the module docstring."""

    def __init__(self, cfg: StalenessConfig, *, batch_groups: int) -> None:
        if batch_groups < 1:
            raise ConfigError(f"batch_groups must be >= 1, got {batch_groups}")
        # Recipe checks reject sync with k > 0; the gate enforces k = 0 there regardless.
        self._k: int | None = 0 if cfg.mode == "sync" else cfg.k
        # fully-async has no k: its default in-flight cap is that of k = 1.
        cap_k = 1 if self._k is None else self._k
        self._mode: Mode = cfg.mode
        self._on_overdue: OverdueAction = cfg.on_overdue
        self._batch = batch_groups
        self._max_inflight = cfg.max_inflight_groups or (cap_k + 1) * batch_groups
        self._version = 0
        self._next_lease_id = 0
        self._outstanding: dict[int, VersionToken] = {}
        self._requeued: set[int] = set()
        self.counters = GateCounters()

    # -- read-only views -------------------------------------------------------------------

    @property
    def mode(self) -> Mode:
        return self._mode

    @property
    def max_staleness(self) -> int | None:
        """Effective ``k``: 0 in ``sync``, ``None`` (unbounded) in ``fully-async``."""
        return self._k

    @property
    def on_overdue(self) -> OverdueAction:
        return self._on_overdue

    @property
    def waits_for_stragglers(self) -> bool:
        """Whether a step must wait for leases it cannot otherwise honour (``wait``, bounded)."""
        return self._k is not None and self._on_overdue == "wait"

    @property
    def batch_groups(self) -> int:
        return self._batch

    @property
    def max_inflight(self) -> int:
        return self._max_inflight

    @property
    def version(self) -> int:
        """Policy version the whole fleet has loaded."""
        return self._version

    @staticmethod
    def version_after(step: int) -> int:
        """The policy version step ``step`` produces (``step + 1``); the one place it is defined."""
        return step + 1

    @property
    def next_step(self) -> int:
        """The step the next redeemed group belongs to (``redeemed // batch_groups``)."""
        return self.counters.redeemed // self._batch

    @property
    def outstanding(self) -> int:
        return len(self._outstanding)

    @property
    def leases_charged(self) -> int:
        """``N`` = redeemed + outstanding: what the admission bound counts."""
        return self.counters.redeemed + len(self._outstanding)

    @property
    def admission_limit(self) -> int | None:
        """``(v + k + 1) * B``, or ``None`` when staleness is unbounded."""
        if self._k is None:
            return None
        return (self._version + self._k + 1) * self._batch

    def outstanding_tokens(self) -> list[VersionToken]:
        """Outstanding leases (current tokens), oldest first."""
        return [self._outstanding[i] for i in sorted(self._outstanding)]

    def current(self, lease_id: int) -> VersionToken | None:
        """The current token of an outstanding lease (a requeue replaces it), else ``None``."""
        return self._outstanding.get(lease_id)

    def was_requeued(self, lease_id: int) -> bool:
        return lease_id in self._requeued

    # -- lease life cycle ------------------------------------------------------------------

    def can_lease(self) -> bool:
        """Whether :meth:`try_lease` would issue a lease now."""
        if len(self._outstanding) >= self._max_inflight:
            return False
        limit = self.admission_limit
        return limit is None or self.leases_charged < limit

    def try_lease(self) -> VersionToken | None:
        """Issue a lease at the current version, or ``None`` (counted) when admission refuses."""
        if not self.can_lease():
            self.counters.refused += 1
            return None
        token = self._token(self._next_lease_id)
        self._next_lease_id += 1
        self._outstanding[token.lease_id] = token
        self.counters.issued += 1
        return token

    def redeem(self, token: VersionToken, step: int) -> None:
        """The lease's group is consumed by ``step`` (which must be :attr:`next_step`)."""
        current = self._lookup(token)
        if step != self.next_step:
            raise ValueError(
                f"lease {token.lease_id} redeemed at step {step}; expected step "
                f"{self.next_step} ({self._batch} groups per step)"
            )
        if current.max_step is not None and step > current.max_step:
            raise ValueError(
                f"lease {token.lease_id} is overdue at step {step} (max_step {current.max_step})"
            )
        self._retire(current.lease_id)
        self.counters.redeemed += 1

    def release(self, token: VersionToken) -> None:
        """The group failed, was filtered or abandoned: the slot is returned."""
        self._retire(self._lookup(token).lease_id)
        self.counters.released += 1

    def drop(self, token: VersionToken) -> None:
        """Like :meth:`release`, counted as an overdue drop."""
        self._retire(self._lookup(token).lease_id)
        self.counters.dropped += 1

    def requeue(self, token: VersionToken) -> VersionToken:
        """Re-issue an outstanding lease at the current version (same ``lease_id``).

        The admission count does not change (one lease replaces another); the new deadline
        ``v + k`` is never already past (see the module docstring).
        """
        if self._k is None:
            raise ValueError("requeue needs a staleness bound (mode is fully-async)")
        self._lookup(token)
        new = self._token(token.lease_id)
        self._outstanding[new.lease_id] = new
        self._requeued.add(new.lease_id)
        self.counters.requeued += 1
        return new

    def advance(self, new_version: int) -> None:
        """The fleet has loaded ``new_version`` (produced by step ``new_version - 1``)."""
        if new_version <= self._version:
            raise ValueError(f"version {new_version} is not newer than {self._version}")
        if new_version > self.next_step:
            raise ValueError(
                f"version {new_version} does not exist yet: only "
                f"{self.next_step} steps have consumed their batch"
            )
        self._version = new_version

    def reclaim(self, keep: Collection[int]) -> list[VersionToken]:
        """Release every outstanding lease not in ``keep`` (lease ids); return them.

        After a resume the in-flight work of the old process is gone: the engine keeps the
        pooled leases and replays the items of the returned ones.
        """
        lost = [tok for tok in self.outstanding_tokens() if tok.lease_id not in keep]
        for tok in lost:
            self.release(tok)
        return lost

    # -- staleness decisions ---------------------------------------------------------------

    def is_overdue(
        self, step: int, token: VersionToken, *, head_version: int | None = None
    ) -> bool:
        """Whether consuming the group at ``step`` would break the bound.

        Overdue when ``step`` is past the lease's ``max_step``, or (given ``head_version`` and
        unless the lease was requeued) when ``step - head_version > k``.
        """
        if self._k is None:
            return False
        current = self._outstanding.get(token.lease_id, token)
        if current.max_step is not None and step > current.max_step:
            return True
        requeued = token.lease_id in self._requeued
        return head_version is not None and not requeued and step - head_version > self._k

    def fate(self, step: int, token: VersionToken, *, head_version: int) -> Fate:
        """A finished group's fate if offered to ``step``.

        In ``wait`` an overdue finished group can only come from a head version older than its
        lease (a fleet anomaly); it is dropped, as training it would break the bound.
        """
        if not self.is_overdue(step, token, head_version=head_version):
            return Fate.TRAIN
        return Fate.REQUEUE if self._on_overdue == "requeue" else Fate.DROP

    def blocking_deadline(self, step: int, taking: Iterable[VersionToken]) -> int | None:
        """The largest ``t`` at which consuming ``taking`` at ``step`` would break (I), or ``None``.

        ``None`` means step ``step`` may consume exactly these leases: every remaining
        outstanding lease can still be consumed by its deadline. Always ``None`` when unbounded.
        """
        if self._k is None:
            return None
        taken: set[int] = set()
        for tok in taking:
            current = self._lookup(tok)
            if current.max_step is not None and current.max_step < step:
                raise ValueError(f"lease {tok.lease_id} is overdue at step {step}")
            taken.add(current.lease_id)
        remaining = sorted(
            tok.max_step
            for lease_id, tok in self._outstanding.items()
            if lease_id not in taken and tok.max_step is not None
        )
        worst: int | None = None
        for count, deadline in enumerate(remaining, start=1):
            if count > (deadline - step) * self._batch:
                worst = deadline
        return worst

    def overdue_outstanding(
        self, step: int, *, exclude: Collection[int] = ()
    ) -> list[VersionToken]:
        """Outstanding leases (not in ``exclude``) whose ``max_step`` is before ``step``."""
        return [
            tok
            for tok in self.outstanding_tokens()
            if tok.max_step is not None and tok.max_step < step and tok.lease_id not in exclude
        ]

    # -- metrics and checkpoints -----------------------------------------------------------

    def metrics(self) -> dict[str, float]:
        c = self.counters
        return {
            "pipeline/policy_version": float(self._version),
            "pipeline/leases_outstanding": float(len(self._outstanding)),
            "pipeline/leases_issued": float(c.issued),
            "pipeline/leases_redeemed": float(c.redeemed),
            "pipeline/leases_released": float(c.released),
            "pipeline/leases_dropped": float(c.dropped),
            "pipeline/leases_requeued": float(c.requeued),
            "pipeline/lease_refusals": float(c.refused),
        }

    def state_dict(self) -> dict[str, Any]:
        """JSON- and msgpack-able state; :meth:`load_state_dict` continues exactly from it."""
        state = GateState(
            mode=self._mode,
            max_staleness=self._k,
            batch_groups=self._batch,
            version=self._version,
            next_lease_id=self._next_lease_id,
            outstanding=self.outstanding_tokens(),
            requeued=sorted(self._requeued),
            counters=self.counters,
        )
        result: dict[str, Any] = msgspec.to_builtins(state)
        return result

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore a :meth:`state_dict`; the config must match the one it was saved under."""
        try:
            loaded = msgspec.convert(dict(state), GateState)
        except msgspec.ValidationError as err:
            raise CheckpointError(f"staleness gate state is malformed: {err}") from err
        saved = (loaded.mode, loaded.max_staleness, loaded.batch_groups)
        if saved != (self._mode, self._k, self._batch):
            raise CheckpointError(
                f"staleness gate was saved with (mode, k, batch_groups) = {saved}, "
                f"but the recipe now says {(self._mode, self._k, self._batch)}"
            )
        self._version = loaded.version
        self._next_lease_id = loaded.next_lease_id
        self._outstanding = {tok.lease_id: tok for tok in loaded.outstanding}
        self._requeued = set(loaded.requeued)
        self.counters = loaded.counters

    # -- internals -------------------------------------------------------------------------

    def _token(self, lease_id: int) -> VersionToken:
        max_step = None if self._k is None else self._version + self._k
        return VersionToken(lease_id=lease_id, version=self._version, max_step=max_step)

    def _lookup(self, token: VersionToken) -> VersionToken:
        current = self._outstanding.get(token.lease_id)
        if current is None:
            raise ValueError(f"lease {token.lease_id} is not outstanding")
        return current

    def _retire(self, lease_id: int) -> None:
        del self._outstanding[lease_id]
        self._requeued.discard(lease_id)
