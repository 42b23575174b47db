from __future__ import annotations

from pathlib import Path

import pytest
import torch

from nexrl_async.core.errors import TrainError, UserCodeError
from nexrl_async.train.hook import PrepareBatchHook

B, T = 2, 3


def _inputs() -> dict[str, torch.Tensor]:
    return {"input_ids": torch.ones(B, T, dtype=torch.int64), "rewards": torch.zeros(B)}


def _run(returned: object) -> object:
    return PrepareBatchHook(lambda batch: returned, name="test")(_inputs())


def test_none_changes_nothing_and_tensors_are_validated() -> None:
    result = _run(None)
    assert result.advantages is None
    assert result.metrics == {}
    ok = _run({"advantages": torch.ones(B, T, dtype=torch.float64), "old_logprobs": None})
    assert ok.advantages.dtype == torch.float32
    assert ok.old_logprobs is None


@pytest.mark.parametrize(
    ("returned", "message"),
    [
        ({"advantage": torch.ones(B)}, "unknown keys"),
        ({"advantages": torch.ones(B + 1)}, "shape"),
        ({"loss_mask": torch.ones(B)}, "shape"),
        ({"rewards": [1.0, 2.0]}, "must be a tensor"),
        ({"advantages": torch.tensor([1.0, float("nan")])}, "non-finite"),
        ({"metrics": {"x": float("inf")}}, "not finite"),
        ({"metrics": {"x": "high"}}, "str to a float"),
        ([1, 2], "not a dict"),
    ],
)
def test_bad_results_are_train_errors(returned: object, message: str) -> None:
    with pytest.raises(TrainError, match=message):
        _run(returned)


def test_user_exceptions_become_user_code_errors() -> None:
    def boom(batch: dict[str, torch.Tensor]) -> None:
        raise KeyError("nope")

    with pytest.raises(UserCodeError, match="KeyError"):
        PrepareBatchHook(boom, name="algo.py:boom")(_inputs())


def test_load_resolves_relative_to_base_dir_and_rejects_non_callables(tmp_path: Path) -> None:
    (tmp_path / "algo.py").write_text(
        "def prepare_batch(batch):\n    return {'metrics': {'b': batch['rewards'].numel()}}\n"
        "NOT_A_FUNCTION = 3\n"
    )
    hook = PrepareBatchHook.load("algo.py:prepare_batch", tmp_path)
    assert hook(_inputs()).metrics == {"train/user/b": 2.0}
    with pytest.raises(UserCodeError, match="not callable"):
        PrepareBatchHook.load("algo.py:NOT_A_FUNCTION", tmp_path)
    with pytest.raises(UserCodeError):
        PrepareBatchHook.load("missing.py:prepare_batch", tmp_path)
