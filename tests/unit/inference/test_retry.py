"""Backoff: bounded, growing, jittered within its band."""

from __future__ import annotations

import random

from nexrl_async.inference.client.retry import RETRYABLE_STATUS, RetryPolicy


def test_delays_grow_and_are_capped() -> None:
    policy = RetryPolicy(base_delay_s=0.1, max_delay_s=0.5, multiplier=2.0, jitter=0.0)
    rng = random.Random(0)
    assert [policy.delay_s(k, rng) for k in range(5)] == [0.1, 0.2, 0.4, 0.5, 0.5]


def test_jitter_stays_within_its_band() -> None:
    policy = RetryPolicy(base_delay_s=1.0, max_delay_s=1.0, jitter=0.5)
    rng = random.Random(1)
    delays = [policy.delay_s(0, rng) for _ in range(200)]
    assert all(0.5 <= d <= 1.0 for d in delays)
    assert max(delays) - min(delays) > 0.3


def test_with_retries_keeps_the_backoff() -> None:
    policy = RetryPolicy(retries=3, base_delay_s=0.7).with_retries(0)
    assert (policy.retries, policy.base_delay_s) == (0, 0.7)


def test_only_gateway_errors_are_retryable() -> None:
    assert frozenset({502, 503, 504}) == RETRYABLE_STATUS
