"""Loading user code named by the recipe, and writing worker events to the run ledger."""

from __future__ import annotations

import math
import textwrap
from pathlib import Path
from typing import Any

import pytest

from nexrl_async.core.errors import UserCodeError
from nexrl_async.core.records import FailureReason, Status
from nexrl_async.obs.ledger import RunLedger, Scored, TurnGenerated, read_events
from nexrl_async.rollout.events import LedgerEvents
from nexrl_async.rollout.loading import load_evaluator, load_tools, load_worker, load_worker_class
from nexrl_async.rollout.worker import RolloutWorker

USER_CODE = '''
from nexrl_async.core.records import EvalResult
from nexrl_async.rollout import RolloutWorker

class Exact:
    def __init__(self):
        self.target = "2"
    def evaluate(self, item, trajectory):
        return EvalResult(reward=float(trajectory.response_text == self.target))

exact_instance = Exact()

def exact_fn(item, trajectory):
    return 1.0

class NeedsArgs:
    def __init__(self, path):
        pass
    def evaluate(self, item, trajectory):
        return 0.0

class Broken:
    def __init__(self):
        raise OSError("model file missing")
    def evaluate(self, item, trajectory):
        return 0.0

class Shouting(RolloutWorker):
    def format_query(self, item):
        return str(item.fields["prompt"]).upper()

class DuckWorker:
    def __init__(self, cfg, **kw):
        self.cfg = cfg
    async def run_group(self, item, token, *, group_id):
        return None

class NotAWorker:
    pass

async def add(a: int, b: int = 1) -> int:
    """Add."""
    return a + b

def lookup(key: str) -> str:
    return key

async def splat(*args):
    return 0

NOT_CALLABLE = 3
'''


@pytest.fixture
def recipe_dir(tmp_path: Path) -> Path:
    (tmp_path / "code.py").write_text(textwrap.dedent(USER_CODE))
    return tmp_path


def test_evaluator_class_instance_and_function(recipe_dir: Path) -> None:
    assert type(load_evaluator("code.py:Exact", recipe_dir)).__name__ == "Exact"
    assert type(load_evaluator("code.py:exact_instance", recipe_dir)).__name__ == "Exact"
    assert callable(load_evaluator("code.py:exact_fn", recipe_dir))


@pytest.mark.parametrize(
    ("ref", "match"),
    [
        ("code.py:NeedsArgs", "NeedsArgs\\(\\) raised TypeError"),
        ("code.py:Broken", "model file missing"),
        ("code.py:NOT_CALLABLE", "not an evaluator"),
        ("code.py:Missing", "no attribute"),
        ("nope.py:Exact", "does not exist"),
    ],
)
def test_bad_evaluators(recipe_dir: Path, ref: str, match: str) -> None:
    with pytest.raises(UserCodeError, match=match):
        load_evaluator(ref, recipe_dir)


def test_worker_classes(recipe_dir: Path) -> None:
    assert load_worker_class(None, recipe_dir) is RolloutWorker
    assert load_worker_class("code.py:Shouting", recipe_dir).__name__ == "Shouting"
    assert load_worker_class("code.py:DuckWorker", recipe_dir).__name__ == "DuckWorker"
    with pytest.raises(UserCodeError, match="must subclass"):
        load_worker_class("code.py:NotAWorker", recipe_dir)
    with pytest.raises(UserCodeError, match="must name a class"):
        load_worker_class("code.py:exact_fn", recipe_dir)


def test_tools(recipe_dir: Path) -> None:
    tools = load_tools(["code.py:add", "code.py:lookup"], recipe_dir)
    assert [t.name for t in tools] == ["add", "lookup"]
    assert tools[0].is_async
    assert not tools[1].is_async
    with pytest.raises(UserCodeError, match="share a name"):
        load_tools(["code.py:add", "code.py:add"], recipe_dir)
    with pytest.raises(UserCodeError, match="splat"):
        load_tools(["code.py:splat"], recipe_dir)
    with pytest.raises(UserCodeError, match="not callable"):
        load_tools(["code.py:NOT_CALLABLE"], recipe_dir)


async def test_load_worker_end_to_end(
    recipe_dir: Path, cfg: Any, tok: Any, scripted: Any, says: Any, item: Any, token: Any
) -> None:
    rollout = cfg(evaluator="code.py:Exact", worker="code.py:Shouting", tools=["code.py:add"])
    gen = scripted(lambda call: says("2"))
    w = load_worker(rollout, tokenizer=tok, generator=gen, base_dir=recipe_dir)
    assert type(w).__name__ == "Shouting"
    assert list(w.tools) == ["add"]
    group = await w.run_group(item("abc"), token, group_id="g")
    assert group.rewards == [1.0, 1.0]
    assert "ABC" in tok.decode(gen.calls[0].input_ids)
    assert "Tools: add" in tok.decode(gen.calls[0].input_ids)


def test_load_worker_wraps_constructor_errors(
    recipe_dir: Path, cfg: Any, tok: Any, scripted: Any
) -> None:
    (recipe_dir / "bad.py").write_text(
        "from nexrl_async.rollout import RolloutWorker\n"
        "class Bad(RolloutWorker):\n"
        "    def __init__(self, cfg, **kw):\n"
        "        raise RuntimeError('no')\n"
    )
    rollout = cfg(evaluator="code.py:Exact", worker="bad.py:Bad")
    with pytest.raises(UserCodeError, match="building the worker raised RuntimeError"):
        load_worker(rollout, tokenizer=tok, generator=scripted(lambda c: None), base_dir=recipe_dir)


def test_ledger_events(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    with RunLedger(path) as ledger:
        sink = LedgerEvents(ledger)
        sink.turn_generated(
            group_id="g", sample_index=1, turn_index=0, n_tokens=5, weight_version=2, server="s"
        )
        sink.scored(group_id="g", sample_index=1, reward=0.5, status=Status.OK, failure=None)
        sink.scored(
            group_id="g",
            sample_index=2,
            reward=math.nan,
            status=Status.FAILED,
            failure=FailureReason.INVALID_REWARD,
        )
    turn, ok, bad = read_events(path)
    assert isinstance(turn, TurnGenerated)
    assert (turn.turn, turn.n_tokens, turn.weight_version, turn.server) == (0, 5, 2, "s")
    assert isinstance(ok, Scored)
    assert ok.reward == 0.5
    assert isinstance(bad, Scored)
    assert bad.reward is None
    assert bad.failure is FailureReason.INVALID_REWARD
