"""What the worker reports while it runs: one call per generated turn and per scored sample.

The engine passes :class:`LedgerEvents` to write them to the run ledger as ``turn_generated``
and ``scored`` events; tests pass a recorder. Calls are synchronous and cheap (the worker makes
them on the event loop).
"""

from __future__ import annotations

import math
from typing import Protocol

from nexrl_async.core.records import FailureReason, Status
from nexrl_async.obs.ledger import RunLedger, Scored, TurnGenerated


class RolloutEvents(Protocol):
    """Receives the worker's progress events."""

    def turn_generated(
        self,
        *,
        group_id: str,
        sample_index: int,
        turn_index: int,
        n_tokens: int,
        weight_version: int,
        server: str,
    ) -> None:
        """Assistant turn ``turn_index`` (0-based, assistant turns only) came back with
        ``n_tokens`` tokens; ``weight_version`` is the oldest version that produced them."""
        ...

    def scored(
        self,
        *,
        group_id: str,
        sample_index: int,
        reward: float,
        status: Status,
        failure: FailureReason | None,
    ) -> None:
        """A sample finished: scored (``status`` OK) or failed with ``failure``."""
        ...


class NoEvents:
    """Drops every event."""

    def turn_generated(
        self,
        *,
        group_id: str,
        sample_index: int,
        turn_index: int,
        n_tokens: int,
        weight_version: int,
        server: str,
    ) -> None:
        return None

    def scored(
        self,
        *,
        group_id: str,
        sample_index: int,
        reward: float,
        status: Status,
        failure: FailureReason | None,
    ) -> None:
        return None


class LedgerEvents:
    """Writes events to a :class:`RunLedger` as ``TurnGenerated`` / ``Scored``."""

    def __init__(self, ledger: RunLedger) -> None:
        self.ledger = ledger

    def turn_generated(
        self,
        *,
        group_id: str,
        sample_index: int,
        turn_index: int,
        n_tokens: int,
        weight_version: int,
        server: str,
    ) -> None:
        self.ledger.emit(
            TurnGenerated(
                group_id=group_id,
                sample_index=sample_index,
                turn=turn_index,
                n_tokens=n_tokens,
                weight_version=weight_version,
                server=server,
            )
        )

    def scored(
        self,
        *,
        group_id: str,
        sample_index: int,
        reward: float,
        status: Status,
        failure: FailureReason | None,
    ) -> None:
        self.ledger.emit(
            Scored(
                group_id=group_id,
                sample_index=sample_index,
                reward=reward if math.isfinite(reward) else None,
                status=status,
                failure=failure,
            )
        )
