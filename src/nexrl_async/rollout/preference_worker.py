"""The preference worker: one data item in, a pair of trajectories built from the data out.

For ``algorithm.mode = "dpo"`` an item holds a prompt and two completions, one *chosen* and one
*rejected*. :class:`PreferenceWorker` turns it into a group of two trajectories with no
inference call: sample 0 is the chosen completion, sample 1 the rejected one, each built
exactly as :class:`~nexrl_async.rollout.sft_worker.SFTWorker` builds its one sample (the prompt
rendered with the chat template or plainly encoded, loss mask 0; the completion encoded and
ended with EOS, loss mask 1)::

    item = {"prompt": "...", "chosen": "...", "rejected": "..."}     (plain or chat prompts)
    group = [sample 0: prompt + chosen + EOS, sample 1: prompt + rejected + EOS]

A completion is text (a number is taken as its text) or, in the chat form of preference data,
a list of messages whose last one is the assistant's answer (its ``content`` is taken). With
``algorithm.dpo.reference = "data"`` the item also carries the reference model's sequence
log-probs of the two completions (``ref_chosen_logprob``, ``ref_rejected_logprob``: sums over
the completion's tokens, EOS included, at temperature 1); they travel to the trainer as the
trajectories' ``ref_logprob`` metric. Class attributes name the fields; a subclass may change
them.

Faults are the SFT worker's, per side (``bad_item`` for a missing or malformed completion, ...);
a pair with a failed side is not trained (the pool drops and replays the group).
``rollout.group_size`` is ignored: a group is always one pair.
"""

from __future__ import annotations

import math
from numbers import Real
from typing import Any

import anyio
import msgspec

from nexrl_async.core.errors import DataError
from nexrl_async.core.records import DataItem, Group, Trajectory, VersionToken
from nexrl_async.data.fields import missing_fields
from nexrl_async.rollout.sft_worker import SFTWorker

SIDE_FIELD = "__preference_side__"
"""Internal: the field of the item view that names the completion being built."""
SIDE_REF_FIELD = "__preference_side_ref__"
"""Internal: the field of the item view that names its reference log-prob."""
REF_LOGPROB_METRIC = "ref_logprob"
"""The trajectory metric that carries a precomputed reference sequence log-prob (the trainer's
``train.dpo.REF_LOGPROB_METRIC``)."""


class PreferenceWorker(SFTWorker):
    """Builds preference pairs from the data; see the module docstring."""

    chosen_field: str = "chosen"
    rejected_field: str = "rejected"
    ref_chosen_field: str = "ref_chosen_logprob"
    ref_rejected_field: str = "ref_rejected_logprob"
    conversations = False  # each side is one completion (format_completion), never a dialogue
    generates = False

    def format_completion(self, item: DataItem) -> str:
        """The text of the side being built: a string, a number, or the last assistant
        message's content. Raise ``DataError`` for a malformed item (``bad_item``)."""
        name = str(item.fields.get(SIDE_FIELD, self.chosen_field))
        _reference(item, str(item.fields.get(SIDE_REF_FIELD, self.ref_chosen_field)))
        value = item.fields.get(name)
        if value is None:
            raise DataError(f"item {item.key} has no field {name!r}")
        if isinstance(value, list) and value and isinstance(value[-1], dict):
            last = value[-1]
            if last.get("role") == "assistant" and isinstance(last.get("content"), str):
                return str(last["content"])
            raise DataError(
                f"item {item.key}: field {name!r} must end with an assistant message with text"
            )
        if isinstance(value, str):
            return value
        if isinstance(value, Real) and not isinstance(value, bool):
            return str(value)
        raise DataError(
            f"item {item.key}: field {name!r} must be text or a list of chat messages, got "
            f"{type(value).__name__}"
        )

    async def run_group(self, item: DataItem, token: VersionToken, *, group_id: str) -> Group:
        """The pair of ``item``: sample 0 chosen, sample 1 rejected (built concurrently)."""
        missing = missing_fields(item, self.required)
        sides = (
            (self.chosen_field, self.ref_chosen_field),
            (self.rejected_field, self.ref_rejected_field),
        )
        built: list[Trajectory | None] = [None, None]

        async def side(index: int, field: str, ref_field: str) -> None:
            fields = {**item.fields, SIDE_FIELD: field, SIDE_REF_FIELD: ref_field}
            view = msgspec.structs.replace(item, fields=fields)
            traj = await self.run_sample(
                view, token, group_id=group_id, sample_index=index, missing=missing
            )
            ref = _reference(item, ref_field) if traj.ok else None
            if ref is not None:
                traj = msgspec.structs.replace(
                    traj, metrics={**traj.metrics, REF_LOGPROB_METRIC: ref}
                )
            built[index] = traj

        async with anyio.create_task_group() as tg:
            for index, (field, ref_field) in enumerate(sides):
                tg.start_soon(side, index, field, ref_field)
        trajectories = [t for t in built if t is not None]
        return Group(group_id=group_id, item_key=item.key, token=token, trajectories=trajectories)


def _reference(item: DataItem, field: str) -> float | None:
    """The item's reference log-prob in ``field`` (``None`` when absent); anything but a finite
    number is a ``DataError`` (the sample fails as ``bad_item``)."""
    value: Any = item.fields.get(field)
    if value is None:
        return None
    if isinstance(value, Real) and not isinstance(value, bool) and math.isfinite(float(value)):
        return float(value)
    raise DataError(f"item {item.key}: field {field!r} must be a finite number, got {value!r}")
