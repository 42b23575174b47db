"""The SFT worker: one data item in, one trajectory built from the data (no inference) out.

For ``algorithm.mode = "sft"`` the engine needs trajectories whose trained tokens are reference
completions from the data, not generations. :class:`SFTWorker` has :class:`RolloutWorker`'s
constructor and ``run_group(item, token, *, group_id) -> Group`` contract, so the engine drives
it exactly like the RL worker; it never calls the generator or the evaluator.

One sample per item, a *demonstration*: chat messages with one or more assistant turns.

- Single-turn: the item has the completion field (``completion_field``, default ``"answer"``):
  the demonstration is ``format_query(item)`` (+ ``rollout.system_prompt``, as the RL worker)
  followed by one assistant message, ``format_completion(item)``.
- Multi-turn: the item has no completion field and its query (``rollout.prompt_field``) is a
  conversation holding assistant messages, e.g. ``user → assistant (tool call) → tool →
  assistant`` (unless a subclass sets ``conversations = False``). Each assistant message is a
  turn to learn; its text is :meth:`~SFTWorker.assistant_text` (the content, then any
  OpenAI-style ``tool_calls`` in the Hermes ``<tool_call>{json}</tool_call>`` form the agent
  loop parses).

Rendering is the RL agent loop's, token for token (``rendering.py``)::

    prompt     = render(messages before the first assistant)       loss mask 0
    per assistant message:
      turn     = render_completion(text)    encode(text) + EOS: what a model that said it
                                            and stopped generated; loss mask 1
      follow   = render_followup(the messages up to the next assistant message, turn)
                                            only the tokens they add, loss mask 0

so an SFT demonstration and an RL sample of the same conversation have the same token ids.
Messages after the last assistant message teach nothing and are left out. Which assistant
turns are trained follows ``rollout.train_turns`` (``all``, or only the ``last``), through the
``loss_mask`` hook. The assistant turns have no log-probs; their tokens carry the lease's
version. The reward is 0.0. Under ``rollout.check_transcript`` the demonstration gets the same
token-exact prefix check as RL samples.

EOS: the tokenizer's EOS ends every assistant turn (a chat model's end-of-turn token when its
tokenizer names it as EOS; override :meth:`render_completion` otherwise).

A group is one sample: ``rollout.group_size`` is ignored (a warning says so when it is not 1).
The engine must run SFT recipes with ``rollout.group_size = 1``; the recipe check requires
``group_size >= 2`` only for group estimators in ``rl`` mode.

Fault boundary (same reasons as the RL worker, ``faults.py``): a missing required field, a
missing or non-text completion, a conversation without an assistant message or a malformed
query fails the sample as ``bad_item``; a render hook or tokenizer error as ``format_error``; a
prompt at or over the token limit (``rollout.max_total_tokens``, else the model's context
length) as ``prompt_rejected``, and a demonstration that does not fit after the prompt is cut
at the limit (the assistant turn the limit falls in ends there with finish reason ``length``).
Past ``rollout.sample_timeout_s`` the sample fails as ``timeout``. Cancellation propagates.
"""

from __future__ import annotations

from collections.abc import Sequence
from numbers import Real
from typing import Any

import anyio
import anyio.lowlevel
import msgspec
from loguru import logger

from nexrl_async.config.rollout import RolloutConfig
from nexrl_async.core.errors import DataError, UserCodeError
from nexrl_async.core.records import (
    DataItem,
    EvalResult,
    FailureReason,
    Group,
    Trajectory,
    Turn,
    VersionSpan,
    VersionToken,
)
from nexrl_async.data.fields import missing_fields
from nexrl_async.rollout.events import RolloutEvents
from nexrl_async.rollout.faults import SampleFailed, classify
from nexrl_async.rollout.generation import TurnGenerator
from nexrl_async.rollout.rendering import Tokenizer, as_token_ids
from nexrl_async.rollout.tools import Message, Tool
from nexrl_async.rollout.transcript import Episode, as_messages, check_transcript, followup_turn
from nexrl_async.rollout.worker import RolloutWorker

DEFAULT_COMPLETION_FIELD = "answer"


class SFTWorker(RolloutWorker):
    """Builds SFT trajectories from the data; see the module docstring.

    Class attributes a recipe's subclass may override: ``completion_field`` (the item field
    holding a single-turn reference completion) and ``append_eos`` (end every assistant turn
    with EOS). Hooks: :meth:`format_query`, :meth:`render`, :meth:`render_followup` and
    :meth:`loss_mask` (inherited, same contracts), :meth:`format_completion`,
    :meth:`assistant_text`, :meth:`render_completion`. ``generator`` and ``evaluator`` are
    accepted for the common constructor and never called.
    """

    completion_field: str = DEFAULT_COMPLETION_FIELD
    append_eos: bool = True
    conversations: bool = True
    """Whether an item without the completion field may be a multi-turn demonstration (its
    query's assistant messages); a subclass that always builds one completion (its own
    :meth:`format_completion`) sets it to ``False``."""
    generates = False

    def __init__(
        self,
        cfg: RolloutConfig,
        *,
        tokenizer: Tokenizer,
        generator: TurnGenerator,
        evaluator: Any,
        tools: Sequence[Tool] = (),
        required: Sequence[str] = (),
        events: RolloutEvents | None = None,
        context_length: int | None = None,
        max_resumes: int = 8,
    ) -> None:
        super().__init__(
            cfg,
            tokenizer=tokenizer,
            generator=generator,
            evaluator=evaluator,
            tools=tools,
            required=required,
            events=events,
            context_length=context_length,
            max_resumes=max_resumes,
        )
        eos = getattr(tokenizer, "eos_token_id", None)
        if self.append_eos and not isinstance(eos, int):
            raise UserCodeError(
                "SFTWorker: the tokenizer has no eos_token_id; set append_eos = False in a "
                "subclass or override render_completion"
            )
        self.eos_token_id: int | None = eos if isinstance(eos, int) else None
        if cfg.group_size != 1:
            logger.warning(
                "SFT builds one sample per item: rollout.group_size = {} is ignored",
                cfg.group_size,
            )

    # ---- hooks -------------------------------------------------------------------------------

    def format_completion(self, item: DataItem) -> str:
        """The reference completion of ``item``: its ``completion_field`` (text or a number).

        Raise ``DataError`` for a malformed item (``bad_item``).
        """
        name = self.completion_field
        value = item.fields.get(name)
        if value is None:
            raise DataError(f"item {item.key} has no field {name!r}")
        if isinstance(value, str):
            return value
        if isinstance(value, Real) and not isinstance(value, bool):
            return str(value)
        raise DataError(f"item {item.key}: field {name!r} must be text, got {type(value).__name__}")

    def assistant_text(self, message: Message) -> str:
        """What the model says in the assistant ``message``: its content, then each of its
        OpenAI-style ``tool_calls`` as ``<tool_call>{"name":...,"arguments":{...}}</tool_call>``
        (compact JSON). Raise ``DataError`` for a malformed message (``bad_item``)."""
        content = message.get("content") or ""
        if not isinstance(content, str):
            raise DataError(f"assistant content must be text, got {type(content).__name__}")
        calls = message.get("tool_calls") or []
        if not isinstance(calls, list):
            raise DataError(f"tool_calls must be a list, got {type(calls).__name__}")
        return content + "".join(_hermes_call(call) for call in calls)

    def render_completion(self, text: str) -> list[int]:
        """Token ids of the assistant turn for ``text``: encoded without special tokens, then
        EOS (when ``append_eos``). Runs in a worker thread."""
        ids = self.renderer.encode(text)
        if self.append_eos and self.eos_token_id is not None:
            ids.append(self.eos_token_id)
        return ids

    # ---- groups and samples ------------------------------------------------------------------

    async def run_group(self, item: DataItem, token: VersionToken, *, group_id: str) -> Group:
        """One SFT sample of ``item`` (a group of one)."""
        missing = missing_fields(item, self.required)
        trajectory = await self.run_sample(
            item, token, group_id=group_id, sample_index=0, missing=missing
        )
        return Group(group_id=group_id, item_key=item.key, token=token, trajectories=[trajectory])

    async def run_sample(
        self,
        item: DataItem,
        token: VersionToken,
        *,
        group_id: str,
        sample_index: int,
        missing: Sequence[str] = (),
    ) -> Trajectory:
        """One sample built from the data, or FAILED; raises only cancellation."""
        ep = Episode(group_id=group_id, item_key=item.key, sample_index=sample_index, token=token)
        start = anyio.current_time()
        failure: tuple[FailureReason, str] | None = None
        try:
            with anyio.move_on_after(self.cfg.sample_timeout_s) as deadline:
                if missing:
                    raise DataError(f"item {item.key} lacks required fields {list(missing)}")
                await self._build(item, ep)
            if deadline.cancelled_caught:
                limit = self.cfg.sample_timeout_s
                failure = (FailureReason.TIMEOUT, f"over sample_timeout_s = {limit} in {ep.stage}")
        except anyio.get_cancelled_exc_class():
            raise
        except Exception as err:  # noqa: BLE001 - the per-sample fault boundary
            failure = classify(err, ep.stage)
            if failure[0] is FailureReason.INTERNAL:
                logger.opt(exception=err).warning("SFT sample {} failed", ep.sticky_key)
        ep.clock("total_s", anyio.current_time() - start)
        result = EvalResult(reward=0.0) if failure is None else None
        trajectory = ep.trajectory(result, failure)
        self.events.scored(
            group_id=group_id,
            sample_index=sample_index,
            reward=trajectory.reward,
            status=trajectory.status,
            failure=trajectory.failure,
        )
        return trajectory

    async def _build(self, item: DataItem, ep: Episode) -> None:
        ep.stage = "format"
        messages, n_prompt = self._demonstration(item)
        ep.stage = "render"
        turns = await self.renderer.run(self._render_turns, messages, n_prompt, ep.token.version)
        await anyio.lowlevel.checkpoint_if_cancelled()  # a deadline passed in the render thread
        limit = self.max_total_tokens
        prompt = turns[0].token_ids
        if limit is not None and len(prompt) >= limit:
            raise SampleFailed(
                FailureReason.PROMPT_REJECTED, f"prompt has {len(prompt)} tokens, limit {limit}"
            )
        for turn in _within(turns, limit):
            ep.append(turn)
        ep.messages = messages
        ep.stage = "hooks"
        ep.turns = self._checked_masks(ep.turns)
        if self.cfg.check_transcript:
            await check_transcript(self.renderer, ep)

    def _demonstration(self, item: DataItem) -> tuple[list[Message], int]:
        """The demonstration's messages up to its last assistant message (those as the text
        the model says) and how many of them form the prompt."""
        query = self._with_system_prompt(as_messages(self.format_query(item)))
        roles = [m.get("role") for m in query]
        single = self.completion_field in item.fields or "assistant" not in roles
        if single or not self.conversations:
            completion = {"role": "assistant", "content": self.format_completion(item)}
            return [*query, completion], len(query)
        last = len(roles) - 1 - roles[::-1].index("assistant")
        messages = [
            {"role": "assistant", "content": self.assistant_text(m)}
            if m.get("role") == "assistant"
            else m
            for m in query[: last + 1]
        ]
        return messages, roles.index("assistant")

    def _render_turns(self, messages: list[Message], n_prompt: int, version: int) -> list[Turn]:
        """Every turn of the demonstration, rendered as the agent loop would (worker thread)."""
        prompt = as_token_ids(self.render(messages[:n_prompt]))
        turns = [Turn(role="user", token_ids=prompt, loss_mask=[0] * len(prompt))]
        said: list[int] = []
        i = n_prompt
        while i < len(messages):  # it ends with an assistant message
            if messages[i].get("role") == "assistant":
                text = str(messages[i]["content"])
                said = as_token_ids(self.render_completion(text))
                if not said:
                    raise SampleFailed(FailureReason.BAD_ITEM, "an empty assistant turn")
                turns.append(_reference_turn(said, text, version, "stop"))
                i += 1
                continue
            j = i
            while messages[j].get("role") != "assistant":
                j += 1
            follow = messages[i:j]
            turns.append(followup_turn(follow, as_token_ids(self.render_followup(follow, said))))
            i = j
        return turns


def _within(turns: list[Turn], limit: int | None) -> list[Turn]:
    """``turns`` cut at ``limit`` tokens: the assistant turn the limit falls in ends there
    (finish reason ``length``), and nothing after it is kept."""
    if limit is None:
        return turns
    kept: list[Turn] = []
    used = 0
    for turn in turns:
        room = limit - used
        if len(turn.token_ids) <= room:
            kept.append(turn)
            used += len(turn.token_ids)
            continue
        if turn.role == "assistant" and room > 0:
            ids = turn.token_ids[:room]
            kept.append(_reference_turn(ids, turn.text or "", turn.versions[0].version, "length"))
        break
    while kept and kept[-1].role != "assistant":
        kept.pop()
    return kept


def _hermes_call(call: Any) -> str:
    """One OpenAI-style tool call (``{"function": {"name", "arguments"}}`` or ``{"name",
    "arguments"}``; arguments an object or a JSON string) in the Hermes text form."""
    fn = call.get("function", call) if isinstance(call, dict) else None
    if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
        raise DataError(f"a tool call needs a function name, got {call!r}")
    arguments = fn.get("arguments") or {}
    if isinstance(arguments, str):
        try:
            arguments = msgspec.json.decode(arguments)
        except msgspec.DecodeError as err:
            raise DataError(f"tool call {fn['name']!r}: arguments are not JSON: {err}") from err
    if not isinstance(arguments, dict):
        raise DataError(f"tool call {fn['name']!r}: arguments must be a JSON object")
    body = msgspec.json.encode({"name": fn["name"], "arguments": arguments}).decode()
    return f"<tool_call>{body}</tool_call>"


def _reference_turn(ids: list[int], text: str, version: int, finish: str) -> Turn:
    """A demonstrated assistant turn: trained on, no log-probs, the lease's version."""
    return Turn(
        role="assistant",
        token_ids=ids,
        loss_mask=[1] * len(ids),
        versions=[VersionSpan(start=0, end=len(ids), version=version)],
        text=text,
        finish_reason=finish,
    )
