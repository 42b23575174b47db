"""``grpo(model=..., dataset=..., reward=fn, steps=...)``: the simple case in one call.

A model (a local Hugging Face folder, or a ``[model]`` section as a mapping), a dataset (a list
of rows, a factory, a ``.jsonl``/``.parquet`` file or a ``save_to_disk`` folder), a reward
function and a few knobs become a recipe; :func:`~nexrl_async.api.entry.train` runs it. Every
other recipe key can still be set through ``overrides``.

The reward function is called ``reward(response, item)`` with the decoded response text and the
item's fields (a dict), from a worker thread, and returns a number, or a dict with ``reward``
and other numbers (logged as ``rollout/<name>_mean`` and ``val/<name>_mean``), or an
``EvalResult``.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from nexrl_async.api.entry import RunResult, train
from nexrl_async.api.recipes import Overrides
from nexrl_async.core.errors import ConfigError
from nexrl_async.core.records import DataItem, EvalResult, Trajectory


class RewardFunction:
    """An evaluator around ``reward(response, item)`` (see the module docstring)."""

    def __init__(self, fn: Callable[[str, dict[str, Any]], Any]) -> None:
        if not callable(fn):
            raise TypeError(f"reward must be callable, got {type(fn).__name__}")
        self.fn = fn
        self.__wrapped__ = fn
        self.__name__ = getattr(fn, "__name__", "reward")
        self.inline = getattr(fn, "inline", False) is True

    def evaluate(self, item: DataItem, trajectory: Trajectory) -> Any:
        out = self.fn(trajectory.response_text, dict(item.fields))
        if isinstance(out, Mapping):
            if "reward" not in out:
                raise ValueError(f"{self.__name__} returned a dict without 'reward': {sorted(out)}")
            metrics = {str(k): float(v) for k, v in out.items() if k != "reward"}
            return EvalResult(reward=float(out["reward"]), metrics=metrics)
        return out


def grpo(
    *,
    model: str | os.PathLike[str] | Mapping[str, Any],
    dataset: Any,
    reward: Callable[[str, dict[str, Any]], Any],
    output: str | os.PathLike[str],
    steps: int | None = None,
    algorithm: str = "grpo",
    validation: Any = None,
    tokenizer: str | os.PathLike[str] | Mapping[str, Any] | None = None,
    group_size: int = 8,
    batch_groups: int = 8,
    max_new_tokens: int = 256,
    lr: float = 1e-6,
    max_staleness: int = 1,
    temperature: float = 1.0,
    chat_template: bool = True,
    overrides: Overrides = None,
    callbacks: Sequence[Any] = (),
) -> RunResult:
    """Train ``model`` on ``dataset`` with ``reward``, GRPO-style; see the module docstring.

    Args:
        model: a local HF folder, or a ``[model]`` mapping (``{"kind": "build", ...}``).
        dataset: rows (dicts with a ``prompt``), a factory returning rows, a data file or
            folder, or a ``[data]`` mapping.
        reward: ``reward(response, item) -> float | dict | EvalResult``.
        output: the run folder.
        steps: training steps (``None``: until the data is exhausted).
        algorithm: the advantage estimator (``grpo``, ``dr_grpo``, ``rloo``, ...;
            docs/algorithms.md).
        validation: validation data, as ``dataset`` (validated before and after training).
        tokenizer: a tokenizer folder or a ``[tokenizer]`` mapping (default: the model's).
        group_size: samples per prompt.
        batch_groups: prompts per training step.
        max_new_tokens: generated tokens per sample.
        lr: learning rate.
        max_staleness: policy versions a sample may lag behind (0: synchronous, on-policy).
        temperature: sampling temperature.
        chat_template: render prompts with the tokenizer's chat template.
        overrides: any other recipe key, as in :func:`train`.
        callbacks: as in :func:`train`.
    """
    recipe: dict[str, Any] = {
        "run": {"name": "grpo", **({"total_steps": steps} if steps is not None else {})},
        "model": _section(model, "model"),
        "data": _data(dataset),
        "rollout": {
            "evaluator": RewardFunction(reward),
            "group_size": group_size,
            "max_new_tokens": max_new_tokens,
            "apply_chat_template": chat_template,
            "sampling": {"temperature": temperature},
        },
        "pool": {"batch_groups": batch_groups},
        "staleness": (
            {"mode": "batch-async", "max_staleness": max_staleness}
            if max_staleness
            else {"mode": "sync", "max_staleness": 0}
        ),
        "algorithm": {"estimator": algorithm},
        "optim": {"lr": lr},
    }
    if tokenizer is not None:
        recipe["tokenizer"] = _section(tokenizer, "tokenizer")
    if validation is not None:
        recipe["validation"] = {"data": _data(validation)}
    return train(recipe, output=output, overrides=overrides, callbacks=callbacks)


def _section(value: str | os.PathLike[str] | Mapping[str, Any], what: str) -> Any:
    if isinstance(value, Mapping):
        return dict(value)
    return {"kind": "pretrained", "path": str(Path(value).expanduser().resolve())}


def _data(value: Any) -> Any:
    """A data section: files by their suffix, anything else as given (rows, a factory, a
    mapping)."""
    if not isinstance(value, str | os.PathLike):
        return value
    path = Path(value).expanduser().resolve()
    if path.is_dir():
        return {"kind": "hf_disk", "path": str(path)}
    kind = {".jsonl": "jsonl", ".parquet": "parquet"}.get(path.suffix)
    if kind is None:
        raise ConfigError(
            f"dataset {str(path)!r}: expected a .jsonl or .parquet file or a folder", path="data"
        )
    return {"kind": kind, "path": str(path)}
