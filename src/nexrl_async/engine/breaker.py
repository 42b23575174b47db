"""The failure-rate breaker: a run whose rollouts keep failing stops, loudly.

Pure synchronous logic, fed by the flow with every group that finished (``record``): over the
last ``faults.window_groups`` groups it warns once the share of groups with failed samples
passes ``faults.warn_failed_fraction`` (counts by reason, once per crossing) and raises
:class:`~nexrl_async.core.errors.RolloutError` naming the top reasons once a full window's
share of *failed* groups (not trained, or trained on fewer than ``pool.min_group_size``
samples that were really scored) reaches ``faults.stop_failed_fraction``. A group trained
without some failed samples (``pool.failed_samples``) counts for the warning, not the stop.
Raised from a rollout worker, the error cancels the run, which exits 1.
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
        self._window: deque[tuple[tuple[str, ...], bool] | None] = deque(maxlen=cfg.window_groups)
        """Per group: ``None`` (no failure), else its failure reasons and whether it failed."""
        self._warned = False
        self._tripped = False

    def record(self, failure_reasons: list[str] | None, *, trained: bool = False) -> None:
        """One finished group: ``None`` when no sample failed, else its failed samples'
        reasons; ``trained``: the group trained anyway (without, or with zeroed, failed
        samples), so it counts for the warning but not for the stop.

        Raises:
            RolloutError: the failed share of a full window reached the stop threshold.
        """
        if self._tripped:  # raised once already: the run is stopping
            return
        entry = None if failure_reasons is None else (tuple(failure_reasons), not trained)
        self._window.append(entry)
        failed = sum(e is not None and e[1] for e in self._window)
        share = failed / len(self._window)
        full = len(self._window) == self._window.maxlen
        if full and share >= self.cfg.stop_failed_fraction:
            self._tripped = True
            raise RolloutError(
                f"rollouts keep failing: {failed} of the last {len(self._window)} groups failed "
                f"({self.describe()}); the run stops (faults.stop_failed_fraction = "
                f"{self.cfg.stop_failed_fraction})"
            )
        troubled = sum(e is not None for e in self._window)
        share = troubled / len(self._window)
        if share > self.cfg.warn_failed_fraction and not self._warned:
            self._warned = True
            logger.warning(
                "{} of the last {} groups had failed samples ({} failed as a whole): {}",
                troubled, len(self._window), failed, self.describe(),
            )  # fmt: skip
        elif share <= self.cfg.warn_failed_fraction:
            self._warned = False

    def describe(self) -> str:
        """Failure reasons in the window, most frequent first (``reason: groups``)."""
        counts = Counter(reason for e in self._window if e for reason in set(e[0]))
        return ", ".join(f"{reason}: {n}" for reason, n in counts.most_common(5)) or "none"
