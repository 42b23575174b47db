"""The public surface of ``nexrl_async.algorithms`` is pinned: changing it is a decision."""

from __future__ import annotations

import inspect

import nexrl_async.algorithms as algorithms

EXPECTED = {
    "AdaptiveKLController",
    "FixedKLController",
    "LossOutput",
    "PairLossInputs",
    "TokenLossInputs",
    "aggregate",
    "aggregation_denominator",
    "builtin_pair_loss",
    "dpo_loss",
    "entropy_from_logits",
    "group_advantages",
    "kl_estimate",
    "logprobs_from_logits",
    "nll_token_loss",
    "overlong_penalty",
    "policy_loss",
    "ppo_token_loss",
    "sft_loss",
    "tis_weights",
    "zero_variance_groups",
}


def test_all_is_pinned() -> None:
    assert set(algorithms.__all__) == EXPECTED
    assert len(algorithms.__all__) == len(EXPECTED)


def test_every_public_name_resolves_and_is_documented() -> None:
    for name in algorithms.__all__:
        obj = getattr(algorithms, name)
        doc = inspect.getdoc(obj)
        assert doc, f"{name} has no docstring"


def test_functions_document_tensor_shapes() -> None:
    for name in algorithms.__all__:
        obj = getattr(algorithms, name)
        if inspect.isfunction(obj):
            doc = inspect.getdoc(obj) or ""
            assert "[B" in doc or "[...]" in doc, f"{name} docstring names no tensor shape"


def test_keyword_names() -> None:
    def kwonly(fn: object) -> set[str]:
        params = inspect.signature(fn).parameters.values()  # type: ignore[arg-type]
        return {p.name for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY}

    assert kwonly(algorithms.group_advantages) == {"estimator", "eps"}
    assert kwonly(algorithms.aggregate) == {"denominator", "norm_constant"}
    assert kwonly(algorithms.policy_loss) == {
        "clip_low",
        "clip_high",
        "dual_clip_c",
        "agg",
        "denominator",
        "norm_constant",
    }
    assert kwonly(algorithms.logprobs_from_logits) == {"temperature"}
    assert kwonly(algorithms.tis_weights) == {"cap", "level", "mode"}
    assert kwonly(algorithms.sft_loss) == {"agg", "denominator"}
    assert kwonly(algorithms.overlong_penalty) == {"max_len", "buffer_len", "penalty_factor"}
