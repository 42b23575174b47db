"""What the scheduler (event loop) and the model runner (torch thread) hand each other.

One call of :meth:`ModelRunner.step` takes a :class:`StepPlan` and returns a
:class:`StepResult`: rows to drop (aborted or retracted), sequences to admit (prefilled in this
step), and one :class:`RowOutput` per row that produced a token. Both sides keep their own copy
of a sequence's tokens; nothing mutable crosses the thread boundary.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from nexrl_async.inference.local.sampling import SamplingSpec

LogprobEntry = tuple[float | None, int]
"""``(logprob, token_id)``; the text element of SGLang's triple is added by the response."""

FinishReason = dict[str, Any]
"""SGLang's ``meta_info.finish_reason`` object, e.g. ``{"type": "length", "length": 16}``."""


def finish_length(max_new_tokens: int) -> FinishReason:
    return {"type": "length", "length": max_new_tokens}


def finish_stop(matched: int | str) -> FinishReason:
    return {"type": "stop", "matched": matched}


def finish_abort(*, waiting: bool = False) -> FinishReason:
    if waiting:
        return {"type": "abort", "message": "Abort in waiting queue"}
    return {"type": "abort", "message": "Aborted", "status_code": None, "err_type": None}


@dataclass(frozen=True, kw_only=True, slots=True)
class LogprobRequest:
    """Which log-probs a sequence wants."""

    enabled: bool = False
    top_n: int = 0
    token_ids: tuple[int, ...] = ()
    input_start: int = -1
    """First prompt position with input log-probs; -1 = none (SGLang ``logprob_start_len``)."""


@dataclass(frozen=True, kw_only=True, slots=True)
class Admission:
    """A sequence entering the batch. After a retraction ``output_ids`` holds what it made."""

    key: int
    prompt_ids: list[int]
    output_ids: list[int]
    sampling: SamplingSpec
    logprobs: LogprobRequest
    wants_text: bool
    """Send the cumulative text with every token (streaming), not only at the end."""


@dataclass(frozen=True, kw_only=True, slots=True)
class StepPlan:
    drop: list[int] = field(default_factory=list)
    """Rows leaving without finishing (aborted or retracted)."""
    admit: list[Admission] = field(default_factory=list)
    decode: bool = True
    """Advance the running rows; False while paused in place (drops and admits still apply)."""


@dataclass(frozen=True, kw_only=True, slots=True)
class InputLogprobs:
    tokens: list[LogprobEntry]
    top: list[list[LogprobEntry] | None]
    by_ids: list[list[LogprobEntry] | None]


@dataclass(frozen=True, kw_only=True, slots=True)
class RowOutput:
    """One new token of one row (or, with ``token is None``, a row that ended without one)."""

    key: int
    token: int | None
    logprob: float | None = None
    top: list[LogprobEntry] | None = None
    by_ids: list[LogprobEntry] | None = None
    text: str | None = None
    """Cumulative text (trimmed as SGLang trims it once finished); None when not tracked."""
    finish: FinishReason | None = None
    input_logprobs: InputLogprobs | None = None


@dataclass(frozen=True, kw_only=True, slots=True)
class StepResult:
    outputs: list[RowOutput]
    dropped_text: dict[int, str]
    """Final text of each dropped row, by key."""
    weight_version: str
    batch_size: int
    """Rows that produced a token in this step."""
