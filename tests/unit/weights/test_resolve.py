"""``weights.transport`` / ``weights.inflight`` ``"auto"``: what each backend gets."""

from __future__ import annotations

import pytest

from nexrl_async.config.inference import (
    AttachInference,
    InferenceConfig,
    LocalInference,
    NoInference,
    SGLangInference,
    WeightsConfig,
    resolve_weights,
)


@pytest.mark.parametrize(
    ("inference", "transport", "inflight"),
    [
        (LocalInference(), "shared", "in_place"),
        (SGLangInference(), "disk", "drain"),
        (AttachInference(urls=["http://h:1"]), "disk", "drain"),
        (NoInference(), "disk", "drain"),
    ],
)
def test_auto_per_backend(inference: InferenceConfig, transport: str, inflight: str) -> None:
    resolved = resolve_weights(WeightsConfig(), inference)
    assert (resolved.transport, resolved.inflight) == (transport, inflight)


def test_explicit_values_are_kept() -> None:
    cfg = WeightsConfig(transport="disk", inflight="interrupt", retries=5)
    assert resolve_weights(cfg, LocalInference()) == cfg


def test_defaults_are_auto() -> None:
    cfg = WeightsConfig()
    assert (cfg.transport, cfg.inflight, cfg.retry_window_s) == ("auto", "auto", None)
