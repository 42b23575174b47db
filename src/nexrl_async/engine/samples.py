"""Decoded samples of a trained batch, for humans: ``samples/step_<s>.jsonl``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import msgspec

from nexrl_async.core.records import TrainBatch

MAX_SAMPLES = 16


def write_samples(path: Path, batch: TrainBatch, tokenizer: Any) -> None:
    """Write up to ``MAX_SAMPLES`` trajectories of ``batch`` with their decoded text."""
    rows = []
    for traj in batch.trajectories[:MAX_SAMPLES]:
        rows.append(
            {
                "group_id": traj.group_id,
                "item_key": traj.item_key,
                "sample_index": traj.sample_index,
                "reward": traj.reward,
                "metrics": traj.metrics,
                "head_version": traj.head_version,
                "text": tokenizer.decode(traj.token_ids, skip_special_tokens=False),
                "response": traj.response_text,
            }
        )
    path.write_bytes(b"".join(msgspec.json.encode(r) + b"\n" for r in rows))
