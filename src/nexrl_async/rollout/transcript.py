"""The token transcript of one sample: the multi-turn token bookkeeping of the agent loop.

The transcript is the sample's context exactly as the model saw it: the prompt's ids, then each
assistant turn's ids as generated, then the ids each follow-up message adds (rendered by
:meth:`nexrl_async.rollout.rendering.ChatRenderer.followup`, never by re-tokenizing history).
An :class:`Episode` holds it while the loop runs and becomes the sample's
:class:`~nexrl_async.core.records.Trajectory`. It collects turns (token ids exactly as they
enter the context), the chat messages they correspond to, the stage the loop is in (for
failure classification) and timings. It is created before the loop starts so that a failed
sample keeps the turns it got through.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import msgspec

from nexrl_async.core.records import (
    EvalResult,
    FailureReason,
    Status,
    Trajectory,
    Turn,
    VersionToken,
)
from nexrl_async.rollout.faults import Stage
from nexrl_async.rollout.generation import AssembledTurn
from nexrl_async.rollout.rendering import ChatRenderer
from nexrl_async.rollout.tools import Message


@dataclass
class Episode:
    """One sample of group ``group_id`` in progress."""

    group_id: str
    item_key: str
    sample_index: int
    token: VersionToken
    messages: list[Message] = field(default_factory=list)
    turns: list[Turn] = field(default_factory=list)
    context: list[int] = field(default_factory=list)
    """Every turn's token ids, concatenated: the next generation's ``input_ids``."""
    stage: Stage = "item"
    timings: dict[str, float] = field(default_factory=dict)
    failure: tuple[FailureReason, str] | None = None
    """Why the sample failed, once it has (set by the worker's fault boundary)."""

    @property
    def sticky_key(self) -> str:
        """Routes every turn of this sample to the same server: ``"<group_id>:<index>"``."""
        return f"{self.group_id}:{self.sample_index}"

    def append(self, turn: Turn) -> None:
        self.turns.append(turn)
        self.context.extend(turn.token_ids)

    def clock(self, key: str, seconds: float) -> None:
        """Add ``seconds`` to ``timings[key]``."""
        self.timings[key] = self.timings.get(key, 0.0) + seconds

    def trajectory(
        self,
        result: EvalResult | None = None,
        failure: tuple[FailureReason, str] | None = None,
    ) -> Trajectory:
        """The record: scored with ``result``, else FAILED with ``failure``."""
        common: dict[str, Any] = {
            "group_id": self.group_id,
            "item_key": self.item_key,
            "sample_index": self.sample_index,
            "token": self.token,
            "turns": list(self.turns),
            "timings": dict(self.timings),
        }
        if failure is None and result is not None:
            return Trajectory(**common, reward=result.reward, metrics=result.metrics)
        if failure is None:
            return Trajectory(**common)
        reason, detail = failure
        return Trajectory(**common, status=Status.FAILED, failure=reason, failure_detail=detail)


def default_mask(turn: Turn) -> Turn:
    """``turn`` with loss mask 1 on model tokens (assistant turns), 0 elsewhere."""
    mask = [int(turn.role == "assistant")] * len(turn.token_ids)
    return turn if turn.loss_mask == mask else msgspec.structs.replace(turn, loss_mask=mask)


def assistant_turn(gen: AssembledTurn, text: str) -> Turn:
    """The assistant turn of ``gen``: trained on (loss mask 1), with its log-probs and versions."""
    return Turn(
        role="assistant",
        token_ids=gen.output_ids,
        loss_mask=[1] * len(gen.output_ids),
        logprobs=gen.logprobs,
        versions=gen.versions,
        text=text,
        finish_reason=gen.finish_reason,
    )


def decode_texts(renderer: ChatRenderer, ids: list[int], with_raw: bool) -> tuple[str, str]:
    """The raw text (special tokens kept, for tool-call parsing; ``""`` unless ``with_raw``)
    and the clean text."""
    raw = renderer.decode(ids, skip_special_tokens=False) if with_raw else ""
    return raw, renderer.decode(ids)
