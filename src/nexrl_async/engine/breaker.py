"""The failure-rate breaker: a run whose rollouts keep failing stops, loudly.

Pure synchronous logic, fed by the flow with every group that finished (``record``): over the
last ``faults.window_groups`` groups it warns once the failed share passes
``faults.warn_failed_fraction`` (counts by reason, once per crossing) and raises
:class:`~nexrl_async.core.errors.RolloutError` naming the top reasons once a full window's
failed share reaches ``faults.stop_failed_fraction``. Raised from a rollout worker, the error
cancels the run, which exits 1.
"""

from __future__ import annotations

from collections import Counter, deque

from loguru import logger

from nexrl_async.config.pipeline import FaultsConfig
from nexrl_async.core.errors import RolloutError


class FailureBreaker:
    """See the module docstring."""

    def __init__(self, cfg: FaultsConfig) -> None:
        self.cfg = cfg
        self._window: deque[tuple[str, ...] | None] = deque(maxlen=cfg.window_groups)
        self._warned = False
        self._tripped = False

    def record(self, failure_reasons: list[str] | None) -> None:
        """One finished group: ``None`` when it succeeded, else its samples' failure reasons.

        Raises:
            RolloutError: the failed share of a full window reached the stop threshold.
        """
        if self._tripped:  # raised once already: the run is stopping
            return
        self._window.append(None if failure_reasons is None else tuple(failure_reasons))
        failed = sum(entry is not None for entry in self._window)
        share = failed / len(self._window)
        full = len(self._window) == self._window.maxlen
        if full and share >= self.cfg.stop_failed_fraction:
            self._tripped = True
            raise RolloutError(
                f"rollouts keep failing: {failed} of the last {len(self._window)} groups failed "
                f"({self.describe()}); the run stops (faults.stop_failed_fraction = "
                f"{self.cfg.stop_failed_fraction})"
            )
        if share > self.cfg.warn_failed_fraction and not self._warned:
            self._warned = True
            logger.warning(
                "{} of the last {} groups failed: {}", failed, len(self._window), self.describe()
            )
        elif share <= self.cfg.warn_failed_fraction:
            self._warned = False

    def describe(self) -> str:
        """Failure reasons in the window, most frequent first (``reason: groups``)."""
        counts = Counter(reason for entry in self._window if entry for reason in entry)
        return ", ".join(f"{reason}: {n}" for reason, n in counts.most_common(5)) or "none"
