"""The token transcript of one sample: the multi-turn token bookkeeping of the agent loop.

The transcript is the sample's context exactly as the model saw it: the prompt's ids, then each
assistant turn's ids as generated, then the ids each follow-up message adds (rendered by
:meth:`nexrl_async.rollout.rendering.ChatRenderer.followup`, never by re-tokenizing history).
An :class:`Episode` holds it while the loop runs and becomes the sample's
:class:`~nexrl_async.core.records.Trajectory`. It collects turns (token ids exactly as they
enter the context), the chat messages they correspond to, the stage the loop is in (for
failure classification) and timings. It is created before the loop starts so that a failed
sample keeps the turns it got through.

The token-exact prefix check (:func:`check_transcript`, run per sample under
``rollout.check_transcript``): the sample's token ids must be a prefix of its whole conversation
rendered at once by the chat template (:meth:`ChatRenderer.conversation`). Passing it means
training sees exactly the tokens a chat-template rendering of the same messages gives: the
prompt and the follow-up deltas joined up without a seam, and no generated token lost or
changed. The model's turns enter as it said them (special tokens included), and a turn in
which the model spelled a word in pieces (``{`` ``"`` ``n``... where the tokenizer has one
token for ``{"name":``) is compared in the tokenizer's own spelling: that is the model's output,
not a seam. It is a prefix, not equality, because the last assistant turn may have stopped early
(its length limit) and templates may end with text after the last message (a newline).

Which assistant turns are trained (``rollout.train_turns``, :func:`trained_turns`): ``all``
keeps loss mask 1 on every assistant turn, ``last`` only on the last one.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, get_args

import msgspec

from nexrl_async.core.errors import RolloutError
from nexrl_async.core.records import (
    EvalResult,
    FailureReason,
    Role,
    Status,
    Trajectory,
    Turn,
    VersionToken,
)
from nexrl_async.rollout.faults import SampleFailed, Stage
from nexrl_async.rollout.generation import AssembledTurn
from nexrl_async.rollout.rendering import ChatRenderer
from nexrl_async.rollout.tools import Message, ToolResult

_ROLES: frozenset[str] = frozenset(get_args(Role))


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


def followup_turn(
    messages: Sequence[Message], ids: list[int], results: Sequence[ToolResult] = ()
) -> Turn:
    """The turn of the follow-up ``messages`` (rendered to ``ids``): not trained, named by its
    first message's role (``user`` for an unknown one), with the tool calls ``results`` ran."""
    role: Any = messages[0].get("role") if messages else "user"
    names = [str(m["name"]) for m in messages if m.get("role") == "tool" and m.get("name")]
    return Turn(
        role=role if role in _ROLES else "user",
        token_ids=ids,
        loss_mask=[0] * len(ids),
        tool_name=",".join(names) or None,
        text="\n".join(str(m.get("content") or "") for m in messages),
        tool_calls=len(results),
        tool_failures=sum(not result.ok for result in results),
    )


def decode_texts(renderer: ChatRenderer, ids: list[int], with_raw: bool) -> tuple[str, str]:
    """The raw text (special tokens kept, for tool-call parsing; ``""`` unless ``with_raw``)
    and the clean text."""
    raw = renderer.decode(ids, skip_special_tokens=False) if with_raw else ""
    return raw, renderer.decode(ids)


def trained_turns(turns: list[Turn], which: Literal["all", "last"]) -> list[Turn]:
    """``turns`` with loss mask 0 on every assistant turn but the last when ``which`` is
    ``last``; unchanged for ``all``."""
    if which == "all":
        return turns
    assistant = [i for i, turn in enumerate(turns) if turn.role == "assistant"]
    keep = assistant[-1] if assistant else -1
    return [
        msgspec.structs.replace(turn, loss_mask=[0] * len(turn.token_ids))
        if turn.role == "assistant" and i != keep
        else turn
        for i, turn in enumerate(turns)
    ]


def prefix_mismatch(token_ids: Sequence[int], rendered: Sequence[int]) -> str | None:
    """``None`` when ``token_ids`` is a prefix of ``rendered`` (the whole conversation rendered
    by the chat template), else where they first differ."""
    for i, (ours, theirs) in enumerate(zip(token_ids, rendered, strict=False)):
        if ours != theirs:
            return f"token {i} is {ours}, the chat template renders {theirs}"
    if len(token_ids) > len(rendered):
        return f"{len(token_ids)} tokens, the chat template renders only {len(rendered)}"
    return None


def checked_masks(turns: list[Turn], masked: list[Turn]) -> list[Turn]:
    """``masked`` (what a ``loss_mask`` hook returned for ``turns``) if it kept every turn's
    token ids and gave each a 0/1 mask of the right length, else :class:`RolloutError`."""
    if [t.token_ids for t in masked] != [t.token_ids for t in turns]:
        raise RolloutError("the loss_mask hook changed turns or token ids")
    for t in masked:
        if len(t.loss_mask) != len(t.token_ids) or any(m not in (0, 1) for m in t.loss_mask):
            raise RolloutError(f"the loss_mask hook returned a bad mask for a {t.role} turn")
    return masked


def as_messages(query: Any) -> list[Message]:
    """A query or follow-up as a fresh list of messages (a string is one user message)."""
    if isinstance(query, str):
        return [{"role": "user", "content": query}]
    if isinstance(query, list) and all(isinstance(m, dict) and "role" in m for m in query):
        return [dict(m) for m in query]
    raise SampleFailed(
        FailureReason.FORMAT_ERROR,
        f"expected a string or a list of message dicts, got {type(query).__name__}",
    )


async def check_transcript(renderer: ChatRenderer, ep: Episode) -> None:
    """The token-exact prefix check of ``ep`` (module docstring); a mismatch fails the sample
    as ``format_error``."""
    ep.stage = "render"
    ours, rendered = await renderer.run(_both_renderings, renderer, ep)
    problem = prefix_mismatch(ours, rendered)
    if problem is not None:
        raise SampleFailed(FailureReason.FORMAT_ERROR, f"transcript not token-exact: {problem}")


def _both_renderings(renderer: ChatRenderer, ep: Episode) -> tuple[list[int], list[int]]:
    """The sample's ids and its conversation rendered at once, the model's turns as it said
    them: each assistant message is its turn's text with special tokens (less the stop token
    that ended it, which the template writes), and in the sample's ids each assistant turn is
    the tokenization of that text (the same ids, unless the model spelled a word in pieces)."""
    specials = set(getattr(renderer.tokenizer, "all_special_ids", ()))
    said: list[str] = []
    ours: list[int] = []
    for turn in ep.turns:
        ids = list(turn.token_ids)
        if turn.role == "assistant":
            cut = turn.finish_reason == "stop" and bool(ids) and ids[-1] in specials
            body, tail = (ids[:-1], ids[-1:]) if cut else (ids, [])
            said.append(renderer.decode(body, skip_special_tokens=False))
            ids = renderer.encode(said[-1]) + tail
        ours.extend(ids)
    # the last assistant messages are the turns; earlier ones (history in the prompt) stay
    spoken = [i for i, m in enumerate(ep.messages) if m.get("role") == "assistant"]
    messages = list(ep.messages)
    for index, text in zip(spoken[len(spoken) - len(said) :], said, strict=True):
        messages[index] = {"role": "assistant", "content": text}
    # a sample the token budget stopped after a follow-up ends with the generation prompt
    waiting = bool(ep.turns) and ep.turns[-1].role != "assistant"
    return ours, renderer.conversation(messages, add_generation_prompt=waiting)
