"""Decoded samples of a trained batch, for humans.

Every ``logging.samples_every_steps`` steps two files hold the same samples (up to
:data:`MAX_SAMPLES`):

- ``samples/step_<s>.jsonl``: one JSON object per sample: ids, reward, evaluator metrics, the
  whole decoded ``text``, the final ``response``, and the ``conversation`` role by role (one
  entry per turn: ``role``, ``text``, ``tokens``, ``trained`` tokens, and for a turn of tool
  results the tools named and ``tool_failures``);
- ``samples/step_<s>.txt``: the same conversations as plain text, one block per sample::

      ## group g12 sample 3 (item 0:42) reward 1.0
      [user] 123*456
      [assistant] <tool_call>{"name":"calc","arguments":{"expr":"123*456"}}</tool_call>
      [tool calc] 56088
      [assistant] =56088

A turn's text is the message it carries (assistant turns: the model's decoded words; tool and
user turns: their message contents); the prompt turn, which has none, is decoded without
special tokens.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import msgspec

from nexrl_async.core.records import TrainBatch, Trajectory, Turn

MAX_SAMPLES = 16


def write_samples(path: Path, batch: TrainBatch, tokenizer: Any) -> None:
    """Write up to ``MAX_SAMPLES`` trajectories of ``batch`` to ``path`` (JSONL) and next to it
    as plain text (``.txt``)."""
    rows = [_row(traj, tokenizer) for traj in batch.trajectories[:MAX_SAMPLES]]
    path.write_bytes(b"".join(msgspec.json.encode(r) + b"\n" for r in rows))
    path.with_suffix(".txt").write_text("\n".join(_block(r) for r in rows), encoding="utf-8")


def _row(traj: Trajectory, tokenizer: Any) -> dict[str, Any]:
    return {
        "group_id": traj.group_id,
        "item_key": traj.item_key,
        "sample_index": traj.sample_index,
        "status": str(traj.status),
        "failure": None if traj.failure is None else str(traj.failure),
        "reward": traj.reward,
        "metrics": traj.metrics,
        "head_version": traj.head_version,
        "text": tokenizer.decode(traj.token_ids, skip_special_tokens=False),
        "response": traj.response_text,
        "conversation": [_turn(turn, tokenizer) for turn in traj.turns],
    }


def _turn(turn: Turn, tokenizer: Any) -> dict[str, Any]:
    text = turn.text
    if text is None:
        text = tokenizer.decode(turn.token_ids, skip_special_tokens=True)
    out: dict[str, Any] = {
        "role": turn.role,
        "text": text,
        "tokens": len(turn.token_ids),
        "trained": sum(turn.loss_mask),
    }
    if turn.tool_name is not None:
        out["tool"] = turn.tool_name
    if turn.tool_calls:
        out["tool_failures"] = turn.tool_failures
    return out


def _block(row: dict[str, Any]) -> str:
    outcome = f"reward {row['reward']:g}"
    if row["failure"] is not None:
        outcome = f"failed: {row['failure']}"
    lines = [
        f"## group {row['group_id']} sample {row['sample_index']} (item {row['item_key']}) "
        + outcome
    ]
    for turn in row["conversation"]:
        who = turn["role"] if "tool" not in turn else f"{turn['role']} {turn['tool']}"
        lines.append(f"[{who}] {turn['text']}")
    return "\n".join(lines) + "\n"
