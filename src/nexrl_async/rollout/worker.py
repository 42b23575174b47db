"""The rollout worker: one leased data item in, one scored :class:`Group` out.

:meth:`RolloutWorker.run_group` runs the group's ``rollout.group_size`` samples and returns
when all are scored or failed. One worker object serves any number of concurrent
``run_group`` calls (it keeps no per-group state), so the engine builds one and runs
``rollout.workers`` tasks that call it.

Agent loop of a group of n samples (docs/architecture.md §2)::

    messages = format_query(item)               (+ rollout.system_prompt), once per group
    prompt   = render(messages)                 loss mask 0, once per group
    firsts   = generate_group(prompt, n)        every sample's first turn: one request
    per sample, concurrently (a task each; inline in the group's task when it cannot wait):
      repeat up to rollout.max_turns:
        turn = firsts[i], then generate(context)  resumed across aborts, per-token versions
        context += turn ids                     exactly as generated, loss mask 1
        follow = on_turn(...)                   hook; None → the tool calls in the turn's text
        stop if nothing follows, the turn hit its length, or the token budget is spent
        context += render_followup(follow)      only the new tokens, loss mask 0
      turns = loss_mask(turns)                  hook (default: rollout.train_turns)
      check the transcript                      under rollout.check_transcript (transcript.py)
      reward = evaluator.evaluate(item, trajectory)

Fault boundary (``faults.guarded``): what a sample raises marks it FAILED with a
:class:`FailureReason` and the others go on; what the shared opening
raises fails every sample alike; a sample past ``rollout.sample_timeout_s`` (counted from the
group's start) fails as ``timeout``. Cancellation always propagates.

Tokenizer work runs on the event loop when cheap, else in a thread (``rendering.py``); the
evaluator's placement is its own declaration (``scoring.py``).

Hooks a recipe's worker subclass may override: :meth:`~RolloutWorker.format_query`,
:meth:`~RolloutWorker.render`, :meth:`~RolloutWorker.render_followup`,
:meth:`~RolloutWorker.loss_mask`, :meth:`~RolloutWorker.on_turn`.
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Sequence
from typing import Any

import anyio

from nexrl_async.config.rollout import RolloutConfig
from nexrl_async.core.errors import DataError, GenerationError, UserCodeError
from nexrl_async.core.records import (
    DataItem,
    EvalResult,
    FailureReason,
    Group,
    Trajectory,
    Turn,
    VersionToken,
)
from nexrl_async.data.fields import missing_fields
from nexrl_async.rollout.events import NoEvents, RolloutEvents
from nexrl_async.rollout.faults import SampleFailed, Stage, guarded
from nexrl_async.rollout.generation import GeneratedTurn, TurnGenerator, generate_turn
from nexrl_async.rollout.rendering import ChatRenderer, Tokenizer, as_token_ids
from nexrl_async.rollout.scoring import as_evaluate_fn, evaluates_inline, score
from nexrl_async.rollout.tools import (
    Message,
    Tool,
    ToolCall,
    ToolResult,
    call_tools,
    parse_tool_calls,
)
from nexrl_async.rollout.transcript import (
    Episode,
    as_messages,
    assistant_turn,
    check_transcript,
    checked_masks,
    decode_texts,
    default_mask,
    followup_turn,
    trained_turns,
)

_Opening = GeneratedTurn | Exception | None
"""A sample's first segment from the group request, or the error it met; ``None`` once used."""


class RolloutWorker:
    """Runs agent loops and scores them; see the module docstring.

    ``evaluator``: an object with ``evaluate(item, trajectory)`` or such a function (sync or
    async). ``required``: item fields every item must have (missing → ``bad_item``).
    ``context_length``: the model's context, the token budget when ``rollout.max_total_tokens``
    is unset (neither set: only ``max_turns × max_new_tokens`` bounds a sample).
    ``max_resumes``: re-submissions of one turn after aborts before it fails.
    """

    generates: bool = True
    """Whether :meth:`run_group` calls the generator; a worker that never does (SFT on the
    data's answers) can run with ``inference.backend = "none"`` (no servers launched)."""

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
        self.cfg = cfg
        self.generator = generator
        self.evaluate_fn = as_evaluate_fn(evaluator)
        self.tools = {tool.name: tool for tool in tools}
        if len(self.tools) != len(tools):
            raise UserCodeError(f"two tools share a name: {[t.name for t in tools]}")
        self.renderer = ChatRenderer(
            tokenizer,
            apply_chat_template=cfg.apply_chat_template,
            tools=[tool.schema for tool in tools],
        )
        self.required = tuple(required)
        self.events: RolloutEvents = events or NoEvents()
        self.max_total_tokens = cfg.max_total_tokens or context_length
        self.max_resumes = max_resumes
        ends_at_first_turn = type(self).on_turn is RolloutWorker.on_turn and (
            cfg.max_turns == 1 or not self.tools
        )
        self._inline_samples = (
            ends_at_first_turn and evaluates_inline(self.evaluate_fn) and not cfg.check_transcript
        )

    # ---- hooks -------------------------------------------------------------------------------

    def format_query(self, item: DataItem) -> list[Message] | str:
        """The query for ``item``: chat messages, or a string taken as one user message.

        Default: the item's ``rollout.prompt_field`` (a string or a list of messages). The
        ``rollout.system_prompt`` is prepended afterwards unless the query starts with a system
        message. Raise ``DataError`` for a malformed item (``bad_item``); anything else raised
        here is ``format_error``.
        """
        name = self.cfg.prompt_field
        value = item.fields.get(name)
        if value is None:
            raise DataError(f"item {item.key} has no field {name!r}")
        if isinstance(value, str):
            return value
        if isinstance(value, list) and all(isinstance(m, dict) and "role" in m for m in value):
            return value
        raise DataError(
            f"item {item.key}: field {name!r} must be a string or a list of chat messages, "
            f"got {type(value).__name__}"
        )

    def render(self, messages: list[Message]) -> list[int]:
        """Prompt ids, ending with the generation prompt. Runs in a worker thread."""
        return self.renderer.prompt(messages)

    def render_followup(self, messages: list[Message], generated_ids: list[int]) -> list[int]:
        """Ids that ``messages`` (tool results, feedback) add after the assistant turn that
        generated ``generated_ids``, ending with the next generation prompt. Runs in a worker
        thread. Default: see ``rendering.py``."""
        return self.renderer.followup(messages, generated_ids)

    def loss_mask(self, turns: list[Turn]) -> list[Turn]:
        """Final loss masks; must keep every turn's token ids. Default: model tokens (assistant
        turns; only the last one under ``rollout.train_turns = "last"``) 1, everything else 0."""
        return trained_turns([default_mask(turn) for turn in turns], self.cfg.train_turns)

    def on_turn(self, item: DataItem, messages: list[Message], turn: Turn) -> Any:
        """Called after every assistant turn (``messages`` already ends with it); may be async.

        Return ``None`` to let the loop decide (run the turn's tool calls if tools are
        configured, else stop), or a list of messages to append next (e.g. environment
        feedback as a user message; ``[]`` stops the episode).
        """
        return None

    # ---- groups and samples ------------------------------------------------------------------

    async def run_group(self, item: DataItem, token: VersionToken, *, group_id: str) -> Group:
        """Run and score ``rollout.group_size`` samples of ``item``.

        The samples share their opening (format, render, the first turn as one group request);
        then each goes on concurrently in its own task (resumes, tools, later turns, scoring),
        except a sample that cannot wait (:meth:`_settles_inline`): it finishes in the group's
        own task, saving a task spawn a sample. One deadline, ``rollout.sample_timeout_s`` from
        the start, covers them all.
        """
        n = self.cfg.group_size
        episodes = [
            Episode(group_id=group_id, item_key=item.key, sample_index=i, token=token)
            for i in range(n)
        ]
        start = time.perf_counter()
        missing = missing_fields(item, self.required)
        done: dict[int, Trajectory] = {}

        async def one(ep: Episode, first: _Opening) -> None:
            result = await guarded([ep], self._play_and_score, item, ep, first)
            done[ep.sample_index] = self._finish(ep, result, start)

        with anyio.move_on_after(self.cfg.sample_timeout_s) as deadline:
            firsts = await guarded(episodes, self._open, item, episodes, missing)
            async with anyio.create_task_group() as tg:
                for ep, first in zip(episodes, firsts or [], strict=False):
                    if self._settles_inline(first):
                        await one(ep, first)
                    else:
                        tg.start_soon(one, ep, first, name=ep.sticky_key)
        for ep in episodes:
            if ep.sample_index not in done:
                if deadline.cancelled_caught and ep.failure is None:
                    limit = f"over sample_timeout_s = {self.cfg.sample_timeout_s}"
                    ep.failure = (FailureReason.TIMEOUT, f"{limit} in {ep.stage}")
                done[ep.sample_index] = self._finish(ep, None, start)
        trajectories = [done[i] for i in range(n)]
        return Group(group_id=group_id, item_key=item.key, token=token, trajectories=trajectories)

    def _settles_inline(self, first: _Opening) -> bool:
        """Whether a sample with opening ``first`` finishes without waiting: its first turn is
        whole (no resume), decodes on the event loop and ends the episode (the default ``on_turn``,
        and one turn or no tools), and scoring runs inline with no transcript check."""
        return (
            self._inline_samples
            and isinstance(first, GeneratedTurn)
            and first.finish_reason != "abort"
            and self.renderer.decodes_inline(first.output_ids)
        )

    def _finish(self, ep: Episode, result: EvalResult | None, start: float) -> Trajectory:
        ep.clock("total_s", time.perf_counter() - start)
        trajectory = ep.trajectory(result, ep.failure)
        self.events.scored(
            group_id=ep.group_id,
            sample_index=ep.sample_index,
            reward=trajectory.reward,
            status=trajectory.status,
            failure=trajectory.failure,
        )
        return trajectory

    async def _open(
        self, item: DataItem, episodes: list[Episode], missing: Sequence[str]
    ) -> list[GeneratedTurn | Exception]:
        """The group's shared opening: every episode gets the rendered prompt; returns each
        sample's first segment (or the error it met) from one group request."""
        if missing:
            raise DataError(f"item {item.key} lacks required fields {list(missing)}")
        _set_stage(episodes, "format")
        messages = self._with_system_prompt(as_messages(self.format_query(item)))
        _set_stage(episodes, "render")
        inline = self.renderer.renders_inline(messages)
        prompt = as_token_ids(await self.renderer.run(self.render, list(messages), inline=inline))
        limit = self.max_total_tokens
        if limit is not None and len(prompt) >= limit:
            raise SampleFailed(
                FailureReason.PROMPT_REJECTED, f"prompt has {len(prompt)} tokens, limit {limit}"
            )
        for ep in episodes:
            ep.messages = [dict(m) for m in messages]
            ep.append(Turn(role="user", token_ids=list(prompt), loss_mask=[0] * len(prompt)))
        _set_stage(episodes, "generate")
        start = time.perf_counter()
        firsts = await self.generator.generate_group(
            list(prompt),
            max_new_tokens=self._budget(episodes[0]),  # >= 1: the prompt is under the limit
            sampling=self.cfg.sampling,
            sticky_keys=[ep.sticky_key for ep in episodes],
        )
        if len(firsts) != len(episodes):
            raise GenerationError(f"{len(firsts)} answers for a group of {len(episodes)}")
        for ep in episodes:
            ep.clock("generate_s", time.perf_counter() - start)
        return firsts

    async def _play_and_score(self, item: DataItem, ep: Episode, first: _Opening) -> EvalResult:
        await self._play(item, ep, first)
        ep.stage = "hooks"
        ep.turns = self._checked_masks(ep.turns)
        if self.cfg.check_transcript:
            await check_transcript(self.renderer, ep)
        ep.stage = "evaluate"
        start = time.perf_counter()
        result = await score(self.evaluate_fn, item, ep.trajectory())
        ep.clock("evaluate_s", time.perf_counter() - start)
        return result

    # ---- the agent loop ----------------------------------------------------------------------

    async def _play(self, item: DataItem, ep: Episode, first: _Opening) -> None:
        """The turns after the opening; ``first`` is the first turn's segment (or ``None``)."""
        for turn_index in range(self.cfg.max_turns):
            budget = self._budget(ep)
            if budget <= 0:
                return
            turn, calls = await self._assistant_turn(ep, budget, turn_index, first)
            first = None
            ep.stage = "hooks"
            follow = self.on_turn(item, ep.messages, turn)
            if inspect.isawaitable(follow):
                follow = await follow
            last = turn_index == self.cfg.max_turns - 1
            results: list[ToolResult] = []
            if follow is None:
                if last or not calls or turn.finish_reason != "stop":
                    return
                ep.stage, start = "tools", time.perf_counter()
                results = await call_tools(self.tools, calls)
                ep.clock("tools_s", time.perf_counter() - start)
                follow = [result.message for result in results]
            if not follow or last:
                return
            await self._followup(ep, as_messages(follow), turn, results)

    def _budget(self, ep: Episode) -> int:
        """Tokens the next turn may generate: ``max_new_tokens``, capped by the token budget."""
        limit = self.max_total_tokens
        budget = self.cfg.max_new_tokens
        return budget if limit is None else min(budget, limit - len(ep.context))

    async def _assistant_turn(
        self, ep: Episode, budget: int, turn_index: int, first: _Opening
    ) -> tuple[Turn, list[ToolCall]]:
        ep.stage = "generate"
        if isinstance(first, Exception):
            raise first  # this sample's answer to the group request
        start = time.perf_counter()
        gen = await generate_turn(
            self.generator,
            list(ep.context),
            max_new_tokens=budget,
            sampling=self.cfg.sampling,
            sticky_key=ep.sticky_key,
            max_resumes=self.max_resumes,
            first=first,
        )
        ep.clock("generate_s", time.perf_counter() - start)
        inline = self.renderer.decodes_inline(gen.output_ids)
        raw, text = await self.renderer.run(
            decode_texts, self.renderer, gen.output_ids, bool(self.tools), inline=inline
        )
        turn = assistant_turn(gen, text)
        ep.append(turn)
        self.events.turn_generated(
            group_id=ep.group_id,
            sample_index=ep.sample_index,
            turn_index=turn_index,
            n_tokens=len(gen.output_ids),
            weight_version=gen.weight_version,
            server=gen.server,
        )
        calls = parse_tool_calls(raw) if self.tools else []
        message: Message = {"role": "assistant", "content": text}
        if calls:
            message["tool_calls"] = [
                {"type": "function", "function": {"name": c.name, "arguments": c.arguments}}
                for c in calls
            ]
        ep.messages.append(message)
        return turn, calls

    async def _followup(
        self, ep: Episode, messages: list[Message], after: Turn, results: list[ToolResult]
    ) -> None:
        ep.stage = "render"
        inline, generated = self.renderer.renders_inline(messages), list(after.token_ids)
        ids = as_token_ids(
            await self.renderer.run(self.render_followup, messages, generated, inline=inline)
        )
        ep.append(followup_turn(messages, ids, results))
        ep.messages.extend(messages)

    def _with_system_prompt(self, messages: list[Message]) -> list[Message]:
        system = self.cfg.system_prompt
        if system is not None and (not messages or messages[0]["role"] != "system"):
            messages.insert(0, {"role": "system", "content": system})
        return messages

    def _checked_masks(self, turns: list[Turn]) -> list[Turn]:
        return checked_masks(turns, self.loss_mask(list(turns)))


def _set_stage(episodes: list[Episode], stage: Stage) -> None:
    for ep in episodes:
        ep.stage = stage
