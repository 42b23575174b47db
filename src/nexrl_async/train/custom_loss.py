"""The ``algorithm.loss`` seam: the mode's built-in loss, or a user function in its place.

Every loss the trainer computes goes through a :class:`LossSeam`: the built-in ones
(:func:`~nexrl_async.algorithms.token_loss.ppo_token_loss` for ``rl``,
:func:`~nexrl_async.algorithms.token_loss.nll_token_loss` for ``sft``,
:func:`~nexrl_async.algorithms.preference.builtin_pair_loss` for ``dpo``) and a recipe's
``algorithm.loss = "file.py:fn"`` (loaded like every user object, relative to the recipe), or a
Python callable set in its place. The function receives the mode's inputs
(:class:`~nexrl_async.algorithms.token_loss.TokenLossInputs` or
:class:`~nexrl_async.algorithms.preference.PairLossInputs`) and returns ``(loss, metrics)`` or a
:class:`~nexrl_async.algorithms.token_loss.LossOutput`; docs/algorithms.md, *Custom loss*, has
the contract.

A user function that raises is a :class:`UserCodeError`; one that returns something else than
a 0-dim tensor and a mapping of numbers is a :class:`TrainError` naming it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Generic, TypeVar

from torch import Tensor

from nexrl_async.algorithms.preference import PairLossInputs, builtin_pair_loss
from nexrl_async.algorithms.token_loss import (
    BUILTIN_TOKEN_LOSSES,
    LossOutput,
    TokenLossInputs,
    nll_token_loss,
)
from nexrl_async.core.errors import TrainError, UserCodeError
from nexrl_async.core.usercode import load_object

In = TypeVar("In", TokenLossInputs, PairLossInputs)

LossSpec = str | Callable[..., object] | None
"""What ``algorithm.loss`` may hold: a ``file.py:fn`` reference, a callable, or unset."""


@dataclass(frozen=True)
class LossSeam(Generic[In]):
    """One loss function and the name its errors carry."""

    fn: Callable[[In], object]
    name: str
    user: bool = False
    """A user function: its exceptions become :class:`UserCodeError`."""

    def __call__(self, inputs: In) -> LossOutput:
        """The function's output, checked and normalised to a :class:`LossOutput`."""
        if not self.user:
            return _checked(self.fn(inputs), self.name)
        try:
            out = self.fn(inputs)
        except Exception as err:
            raise UserCodeError(
                f"algorithm.loss {self.name} raised {type(err).__name__}: {err}"
            ) from err
        return _checked(out, self.name)

    def metric_floats(self, values: Mapping[str, object]) -> dict[str, float]:
        """``{key: float}`` of a metrics mapping (numbers or 0-dim tensors); a user function's
        keys become ``user/<key>`` (reported as ``train/user/<key>``)."""
        prefix = "user/" if self.user else ""
        return {f"{prefix}{key}": _number(value, key, self.name) for key, value in values.items()}


def _load(spec: LossSpec, base_dir: Path) -> tuple[Callable[..., object], str] | None:
    if spec is None:
        return None
    if isinstance(spec, str):
        fn = load_object(spec, base_dir)
        name = spec
    else:
        fn, name = spec, getattr(spec, "__qualname__", repr(spec))
    if not callable(fn):
        raise UserCodeError(f"algorithm.loss = {name!r} is not callable")
    return fn, name


def loss_seams(
    mode: str, spec: LossSpec, base_dir: Path
) -> tuple[LossSeam[TokenLossInputs], LossSeam[PairLossInputs]]:
    """``(token seam, pair seam)``: the one of ``mode`` calls ``spec`` (a ``file.py:fn``
    reference relative to ``base_dir``, or a callable), or the built-in when ``spec`` is
    ``None``; the other is its built-in (``sft``'s for ``dpo``, never called)."""
    token = LossSeam(BUILTIN_TOKEN_LOSSES.get(mode, nll_token_loss), name=f"built-in {mode} loss")
    pair = LossSeam(builtin_pair_loss, name="built-in dpo loss")
    loaded = _load(spec, base_dir)
    if loaded is None:
        return token, pair
    if mode == "dpo":
        return token, LossSeam(loaded[0], name=loaded[1], user=True)
    return LossSeam(loaded[0], name=loaded[1], user=True), pair


def _checked(out: object, name: str) -> LossOutput:
    if isinstance(out, LossOutput):
        result = out
    elif isinstance(out, tuple) and len(out) in (2, 3):
        result = LossOutput(*out)
    else:
        raise TrainError(
            f"algorithm.loss {name} returned {type(out).__name__}; expected (loss, metrics)"
        )
    if not isinstance(result.loss, Tensor) or result.loss.dim() != 0:
        shape = tuple(result.loss.shape) if isinstance(result.loss, Tensor) else None
        raise TrainError(
            f"algorithm.loss {name}: the loss must be a 0-dim tensor; got "
            f"{type(result.loss).__name__} {shape or ''}".rstrip()
        )
    for label, values in (("metrics", result.metrics), ("parts", result.parts)):
        if not isinstance(values, Mapping):
            raise TrainError(f"algorithm.loss {name}: {label} must be a dict of numbers")
    return result


def _number(value: object, key: object, name: str) -> float:
    if isinstance(value, Tensor) and value.numel() == 1:
        number = float(value.detach())
    elif isinstance(value, int | float) and not isinstance(value, bool):
        number = float(value)
    else:
        raise TrainError(
            f"algorithm.loss {name}: metric {key!r} must be a number or a 0-dim tensor; got "
            f"{type(value).__name__}"
        )
    if not isinstance(key, str):
        raise TrainError(f"algorithm.loss {name}: metric names must be str; got {key!r}")
    return number
