"""The ``algorithm.prepare_batch`` seam: user code that rewrites advantages, rewards or masks.

A recipe sets ``prepare_batch = "algo.py:prepare_batch"``; the function is called once per RL
training step, in the trainer's worker thread, after the default advantages are computed and
before any optimizer step::

    def prepare_batch(batch: dict[str, torch.Tensor]) -> dict[str, object] | None: ...

``batch`` (CPU tensors, copies the function may keep or modify; ``B`` rows, ``T`` padded width,
column ``t`` describes token ``input_ids[:, t]``):

=================== ========== ===========================================================
``input_ids``       [B, T] i64 all turns concatenated, right-padded
``attention_mask``  [B, T] i64 1 on real tokens
``loss_mask``       [B, T] f32 1 where the token is trained
``rewards``         [B] f32    evaluator reward plus shaping (overlong penalty)
``raw_rewards``     [B] f32    evaluator reward
``group_ids``       [B] i64    dense group index (samples of one prompt share it)
``response_lengths`` [B] i64   tokens of the longest assistant turn
``trainer_logprobs`` [B, T] f32 log-probs under the weights before this step
``rollout_logprobs`` [B, T] f32 the server's log-probs (0 where ``rollout_mask`` is False)
``rollout_mask``    [B, T] bool loss tokens with a server log-prob
``old_logprobs``    [B, T] f32 the PPO ratio's denominator (``algorithm.old_logprobs``)
``ref_logprobs``    [B, T] f32 reference-model log-probs (only when KL is on)
``advantages``      [B, T] f32 the configured estimator's advantages (KL-in-reward applied)
``step``            [] i64     the training step
=================== ========== ===========================================================

The function returns ``None`` (change nothing) or a mapping with any of:

- ``advantages``: ``[B]`` or ``[B, T]``, the advantages to train on (TIS weights, if enabled,
  still multiply them);
- ``rewards``: ``[B]``; advantages are recomputed from them (estimator, KL-in-reward) unless
  ``advantages`` is also returned;
- ``loss_mask``: ``[B, T]`` 0/1, the tokens to train on;
- ``old_logprobs``: ``[B, T]``, the PPO ratio's denominator;
- ``metrics``: ``{name: float}``, logged as ``train/user/<name>``.

Any other key, a wrong shape or a non-finite value is a :class:`TrainError`; an exception inside
the function is a :class:`UserCodeError`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from nexrl_async.core.errors import TrainError, UserCodeError
from nexrl_async.core.usercode import load_object

RETURN_KEYS = frozenset({"advantages", "rewards", "loss_mask", "old_logprobs", "metrics"})


@dataclass(frozen=True)
class HookResult:
    """What a ``prepare_batch`` call changed (``None``: keep the trainer's own)."""

    advantages: Tensor | None = None
    rewards: Tensor | None = None
    loss_mask: Tensor | None = None
    old_logprobs: Tensor | None = None
    metrics: dict[str, float] = field(default_factory=dict)


class PrepareBatchHook:
    """A loaded ``prepare_batch`` function; calling it validates what it returns."""

    def __init__(self, fn: Callable[[dict[str, Tensor]], object], *, name: str) -> None:
        self._fn = fn
        self.name = name

    @classmethod
    def load(cls, ref: str, base_dir: Path) -> PrepareBatchHook:
        """Import ``ref`` (``file.py:name`` relative to ``base_dir``, or ``module:name``)."""
        fn = load_object(ref, base_dir)
        if not callable(fn):
            raise UserCodeError(f"algorithm.prepare_batch = {ref!r} is not callable")
        return cls(fn, name=ref)

    def __call__(self, batch: dict[str, Tensor]) -> HookResult:
        size, width = batch["input_ids"].shape
        inputs = {k: v.detach().clone() for k, v in batch.items()}
        try:
            out = self._fn(inputs)
        except Exception as err:
            raise UserCodeError(
                f"prepare_batch {self.name} raised {type(err).__name__}: {err}"
            ) from err
        if out is None:
            return HookResult()
        if not isinstance(out, Mapping):
            raise TrainError(f"prepare_batch {self.name} returned {type(out).__name__}, not a dict")
        unknown = set(out) - RETURN_KEYS
        if unknown:
            raise TrainError(
                f"prepare_batch {self.name} returned unknown keys {sorted(unknown)}; "
                f"allowed: {sorted(RETURN_KEYS)}"
            )
        return HookResult(
            advantages=self._tensor(out, "advantages", ((size,), (size, width))),
            rewards=self._tensor(out, "rewards", ((size,),)),
            loss_mask=self._tensor(out, "loss_mask", ((size, width),)),
            old_logprobs=self._tensor(out, "old_logprobs", ((size, width),)),
            metrics=self._metrics(out.get("metrics")),
        )

    def _tensor(
        self, out: Mapping[str, object], key: str, shapes: tuple[tuple[int, ...], ...]
    ) -> Tensor | None:
        value = out.get(key)
        if value is None:
            return None
        if not isinstance(value, Tensor):
            raise TrainError(f"prepare_batch {self.name}: {key!r} must be a tensor")
        if tuple(value.shape) not in shapes:
            raise TrainError(
                f"prepare_batch {self.name}: {key!r} has shape {tuple(value.shape)}; "
                f"expected one of {list(shapes)}"
            )
        result = value.detach().to("cpu", torch.float32)
        if not bool(torch.isfinite(result).all()):
            raise TrainError(f"prepare_batch {self.name}: {key!r} has non-finite values")
        return result

    def _metrics(self, value: object) -> dict[str, float]:
        if value is None:
            return {}
        if not isinstance(value, Mapping):
            raise TrainError(f"prepare_batch {self.name}: 'metrics' must be a dict")
        metrics: dict[str, float] = {}
        for name, number in value.items():
            number = float(number.item()) if isinstance(number, Tensor) else number
            if not isinstance(name, str) or not isinstance(number, int | float):
                raise TrainError(
                    f"prepare_batch {self.name}: metric {name!r} must map a str to a float"
                )
            if not math.isfinite(number):
                raise TrainError(f"prepare_batch {self.name}: metric {name!r} is not finite")
            metrics[f"train/user/{name}"] = float(number)
        return metrics
