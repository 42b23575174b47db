"""Bounded, jittered exponential backoff for transport errors and 502/503/504 only."""

from __future__ import annotations

import random
from typing import Annotated

from msgspec import Meta, Struct

RETRYABLE_STATUS = frozenset({502, 503, 504})
"""HTTP statuses retried by the client (docs/style.md, Async 3).

Every other 4xx/5xx fails at once.
"""


class RetryPolicy(Struct, frozen=True, kw_only=True):
    """How many times, and how long to wait between attempts.

    Attempt ``k`` (0-based, after the ``k``-th failure) waits
    ``min(max_delay_s, base_delay_s * multiplier**k) * uniform(1 - jitter, 1)``.
    """

    retries: Annotated[int, Meta(ge=0)] = 3
    """Retries after the first attempt (0: try once)."""
    base_delay_s: Annotated[float, Meta(ge=0.0)] = 0.2
    """Wait before the first retry (before jitter)."""
    max_delay_s: Annotated[float, Meta(ge=0.0)] = 10.0
    """Cap on a single wait."""
    multiplier: Annotated[float, Meta(ge=1.0)] = 2.0
    """Growth factor per retry."""
    jitter: Annotated[float, Meta(ge=0.0, le=1.0)] = 0.5
    """Fraction of each wait drawn at random (0: none, 1: full jitter)."""

    def delay_s(self, attempt: int, rng: random.Random) -> float:
        """Seconds to wait after failed attempt ``attempt`` (0-based)."""
        ceiling = min(self.max_delay_s, self.base_delay_s * self.multiplier**attempt)
        return ceiling * (1.0 - self.jitter * rng.random())

    def with_retries(self, retries: int) -> RetryPolicy:
        """The same backoff with another retry budget."""
        return RetryPolicy(
            retries=retries,
            base_delay_s=self.base_delay_s,
            max_delay_s=self.max_delay_s,
            multiplier=self.multiplier,
            jitter=self.jitter,
        )
