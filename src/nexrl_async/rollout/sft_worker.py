"""The SFT worker: one data item in, one trajectory built from the data (no inference) out.

For ``algorithm.mode = "sft"`` the engine needs trajectories whose trained tokens are a
reference completion from the data, not a generation. :class:`SFTWorker` has
:class:`RolloutWorker`'s constructor and ``run_group(item, token, *, group_id) -> Group``
contract, so the engine drives it exactly like the RL worker; it never calls the generator or
the evaluator.

One sample per item::

    messages   = format_query(item)        (+ rollout.system_prompt), as the RL worker
    prompt     = render(messages)          chat template or plain encode, loss mask 0
    completion = format_completion(item)   the item's ``completion_field`` (default "answer")
    answer     = render_completion(text)   encode(text) + EOS, one assistant turn, loss mask 1

The assistant turn is what a model that answered ``completion`` and stopped would have
generated: its tokens without special tokens, then the tokenizer's EOS (a chat model's
end-of-turn token when its tokenizer names it as EOS; override :meth:`render_completion`
otherwise). It has no log-probs; its tokens carry the lease's version. The reward is 0.0.

A group is one sample: ``rollout.group_size`` is ignored (a warning says so when it is not 1).
The engine must run SFT recipes with ``rollout.group_size = 1``; the recipe check requires
``group_size >= 2`` only for group estimators in ``rl`` mode.

Fault boundary (same reasons as the RL worker, ``faults.py``): a missing required field, a
missing or non-text completion, or a malformed query fails the sample as ``bad_item``; a render
hook or tokenizer error as ``format_error``; a prompt at or over the token limit
(``rollout.max_total_tokens``, else the model's context length) as ``prompt_rejected``, and a
completion that does not fit after the prompt is cut to the limit (finish reason ``length``).
Past ``rollout.sample_timeout_s`` the sample fails as ``timeout``. Cancellation propagates.
"""

from __future__ import annotations

from collections.abc import Sequence
from numbers import Real
from typing import Any

import anyio
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
from nexrl_async.rollout.tools import Tool
from nexrl_async.rollout.transcript import Episode
from nexrl_async.rollout.worker import RolloutWorker, _as_messages

DEFAULT_COMPLETION_FIELD = "answer"


class SFTWorker(RolloutWorker):
    """Builds SFT trajectories from the data; see the module docstring.

    Class attributes a recipe's subclass may override: ``completion_field`` (the item field
    holding the reference completion) and ``append_eos`` (end the completion with EOS). Hooks:
    :meth:`format_query`, :meth:`render` and :meth:`loss_mask` (inherited, same contracts),
    :meth:`format_completion`, :meth:`render_completion`. ``generator`` and ``evaluator``
    are accepted for the common constructor and never called.
    """

    completion_field: str = DEFAULT_COMPLETION_FIELD
    append_eos: bool = True
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
        messages = self._with_system_prompt(_as_messages(self.format_query(item)))
        text = self.format_completion(item)
        ep.messages = messages
        ep.stage = "render"
        prompt = as_token_ids(await self.renderer.run(self.render, list(messages)))
        answer = as_token_ids(await self.renderer.run(self.render_completion, text))
        limit = self.max_total_tokens
        if limit is not None and len(prompt) >= limit:
            raise SampleFailed(
                FailureReason.PROMPT_REJECTED, f"prompt has {len(prompt)} tokens, limit {limit}"
            )
        finish = "stop"
        if limit is not None and len(prompt) + len(answer) > limit:
            answer, finish = answer[: limit - len(prompt)], "length"
        if not answer:
            raise SampleFailed(FailureReason.BAD_ITEM, f"item {item.key}: empty completion")
        ep.append(Turn(role="user", token_ids=prompt, loss_mask=[0] * len(prompt)))
        ep.append(_reference_turn(answer, text, ep.token.version, finish))
        ep.messages.append({"role": "assistant", "content": text})
        ep.stage = "hooks"
        ep.turns = self._checked_masks(ep.turns)


def _reference_turn(ids: list[int], text: str, version: int, finish: str) -> Turn:
    """The completion as an assistant turn: trained on, no log-probs, the lease's version."""
    return Turn(
        role="assistant",
        token_ids=ids,
        loss_mask=[1] * len(ids),
        versions=[VersionSpan(start=0, end=len(ids), version=version)],
        text=text,
        finish_reason=finish,
    )
