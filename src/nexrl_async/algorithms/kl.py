"""Per-token KL estimators against a reference policy, and KL-coefficient controllers.

The estimators follow Schulman's note "Approximating KL divergence" (2020): samples come from
the current policy ``pi``, and each estimator's expectation under ``pi`` approximates
``KL(pi || pi_ref)`` (``k1``, ``k3`` unbiased; ``k2`` biased, low variance).
"""

from __future__ import annotations

import math
from typing import Literal, get_args

import torch
from torch import Tensor

from nexrl_async.config.training import KLConfig
from nexrl_async.core.errors import ConfigError

KLKind = Literal["k1", "abs", "k2", "k3"]
KL_KINDS: tuple[str, ...] = get_args(KLKind)

K3_LOG_RATIO_CLAMP = 20.0
K3_VALUE_CLAMP = 10.0


def kl_estimate(logprobs: Tensor, ref_logprobs: Tensor, kind: KLKind) -> Tensor:
    """Per-token KL estimate between the policy and the reference policy.

    With ``k1 = logprobs - ref_logprobs`` (per token):

    - ``k1``:  ``k1``
    - ``abs``: ``|k1|``
    - ``k2``:  ``0.5 · k1²``
    - ``k3``:  ``exp(d) - d - 1`` with ``d = clamp(ref_logprobs - logprobs, -20, 20)``, the
      result clamped to ``[-10, 10]`` (as verl's low-variance KL does); ``>= 0``.

    All kinds are 0 where the two log-prob sets are equal. The result is not masked: reduce it
    with :func:`aggregate`. Gradients flow through both inputs (detach ``ref_logprobs`` upstream).

    Args:
        logprobs: ``[B, T]`` log-probs of the sampled tokens under the policy.
        ref_logprobs: ``[B, T]`` log-probs of the same tokens under the reference policy.
        kind: ``k1``, ``abs``, ``k2`` or ``k3``.

    Returns:
        ``[B, T]`` per-token estimates.
    """
    if kind not in KL_KINDS:
        raise ValueError(f"unknown KL kind {kind!r}; expected one of {KL_KINDS}")
    if logprobs.shape != ref_logprobs.shape:
        raise ValueError(
            f"logprobs and ref_logprobs must match; got {tuple(logprobs.shape)} and "
            f"{tuple(ref_logprobs.shape)}"
        )
    k1 = logprobs - ref_logprobs
    if kind == "k1":
        return k1
    if kind == "abs":
        return k1.abs()
    if kind == "k2":
        return 0.5 * k1.square()
    d = (-k1).clamp(-K3_LOG_RATIO_CLAMP, K3_LOG_RATIO_CLAMP)
    return (torch.exp(d) - d - 1.0).clamp(-K3_VALUE_CLAMP, K3_VALUE_CLAMP)


def _finite_state(state: dict[str, float]) -> float:
    if set(state) != {"coef"}:
        raise ValueError(f"KL controller state must have exactly the key 'coef'; got {set(state)}")
    coef = float(state["coef"])
    if not math.isfinite(coef):
        raise ValueError(f"KL controller state has a non-finite coef: {coef}")
    return coef


class FixedKLController:
    """A constant KL coefficient: ``coef`` never changes; ``update`` is a no-op.

    Args:
        coef: the KL coefficient ``beta >= 0`` (0 logs KL without penalising it).
    """

    def __init__(self, coef: float) -> None:
        if not (math.isfinite(coef) and coef >= 0):
            raise ValueError(f"coef must be finite and >= 0; got {coef}")
        self.coef = float(coef)

    def update(self, current_kl: float, n_steps: int) -> None:
        """Do nothing: the coefficient is fixed. Same signature as the adaptive controller."""

    def state_dict(self) -> dict[str, float]:
        """``{"coef": coef}`` for checkpoints."""
        return {"coef": self.coef}

    def load_state_dict(self, state: dict[str, float]) -> None:
        """Restore ``coef`` from :meth:`state_dict` output."""
        coef = _finite_state(state)
        if coef < 0:
            raise ValueError(f"coef must be >= 0; got {coef}")
        self.coef = coef


class AdaptiveKLController:
    """Adaptive KL coefficient, the proportional rule of Ziegler et al. (2019).

    After each update with the observed KL::

        error = clip(current_kl / target_kl - 1, -0.2, 0.2)
        coef  = coef · (1 + error · n_steps / horizon)

    ``n_steps`` and ``horizon`` share a unit (samples in the original; steps work as well).

    Args:
        init_coef: starting coefficient, ``> 0``.
        target_kl: the KL the rule steers towards, ``> 0``.
        horizon: how many ``n_steps`` units a full 20% correction takes, ``> 0``.
    """

    def __init__(self, init_coef: float, target_kl: float, horizon: float) -> None:
        for name, value in (
            ("init_coef", init_coef),
            ("target_kl", target_kl),
            ("horizon", horizon),
        ):
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be finite and > 0; got {value}")
        self.coef = float(init_coef)
        self.target_kl = float(target_kl)
        self.horizon = float(horizon)

    def update(self, current_kl: float, n_steps: int) -> None:
        """Apply one step of the rule above with the KL measured over ``n_steps``.

        ``0 <= n_steps <= horizon``, so the factor stays in ``[0.8, 1.2]`` and ``coef > 0``.
        """
        if not math.isfinite(current_kl):
            raise ValueError(f"current_kl must be finite; got {current_kl}")
        if not 0 <= n_steps <= self.horizon:
            raise ValueError(f"n_steps must be in [0, horizon={self.horizon}]; got {n_steps}")
        error = min(max(current_kl / self.target_kl - 1.0, -0.2), 0.2)
        self.coef *= 1.0 + error * n_steps / self.horizon

    def state_dict(self) -> dict[str, float]:
        """``{"coef": coef}``; ``target_kl`` and ``horizon`` come from the config."""
        return {"coef": self.coef}

    def load_state_dict(self, state: dict[str, float]) -> None:
        """Restore ``coef`` from :meth:`state_dict` output."""
        coef = _finite_state(state)
        if coef <= 0:
            raise ValueError(f"coef must be > 0; got {coef}")
        self.coef = coef


KLController = FixedKLController | AdaptiveKLController


def kl_controller(cfg: KLConfig) -> KLController:
    """The controller ``[algorithm.kl]`` asks for (raises ``ConfigError`` on bad values)."""
    try:
        if cfg.controller == "adaptive":
            return AdaptiveKLController(cfg.coef, cfg.target, cfg.horizon)
        return FixedKLController(cfg.coef)
    except ValueError as err:
        raise ConfigError(f"algorithm.kl: {err}", path="algorithm.kl") from err
