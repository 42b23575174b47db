"""Rollout: the worker task that runs one agent loop per sample, evaluators, tools.

Owns: the agent loop (token-exact turn appending, loss masks, max_turns), the Evaluator glue,
worker hooks (``format_query``, ``loss_mask``), and the per-sample fault boundary.
Must not import: ``train``, ``weights``, ``engine``.

The engine adapts its inference client to :class:`TurnGenerator` (``generation.py``), builds
one worker with :func:`load_worker` and calls :meth:`RolloutWorker.run_group` per leased item.
"""

from nexrl_async.rollout.events import LedgerEvents, NoEvents, RolloutEvents
from nexrl_async.rollout.faults import SampleFailed, classify
from nexrl_async.rollout.generation import (
    AssembledTurn,
    GeneratedTurn,
    TurnGenerator,
    generate_each,
    generate_turn,
)
from nexrl_async.rollout.loading import load_evaluator, load_tools, load_worker, load_worker_class
from nexrl_async.rollout.rendering import ChatRenderer, Tokenizer
from nexrl_async.rollout.scoring import as_evaluate_fn, score, vet_result
from nexrl_async.rollout.tools import (
    Message,
    Tool,
    ToolCall,
    ToolResult,
    call_tools,
    parse_tool_calls,
    run_tool_calls,
)
from nexrl_async.rollout.transcript import Episode
from nexrl_async.rollout.worker import RolloutWorker

__all__ = [
    "AssembledTurn",
    "ChatRenderer",
    "Episode",
    "GeneratedTurn",
    "LedgerEvents",
    "Message",
    "NoEvents",
    "RolloutEvents",
    "RolloutWorker",
    "SampleFailed",
    "Tokenizer",
    "Tool",
    "ToolCall",
    "ToolResult",
    "TurnGenerator",
    "as_evaluate_fn",
    "call_tools",
    "classify",
    "generate_each",
    "generate_turn",
    "load_evaluator",
    "load_tools",
    "load_worker",
    "load_worker_class",
    "parse_tool_calls",
    "run_tool_calls",
    "score",
    "vet_result",
]
