"""The seam between the agent loop and inference: :class:`TurnGenerator`, and resuming aborts.

The worker knows nothing about servers, routing or HTTP. It calls two methods::

    segs = await generator.generate_group(prompt_ids, max_new_tokens=n, sampling=cfg.sampling,
                                          sticky_keys=["g7:0", ..., "g7:7"])
    seg = await generator.generate(input_ids, max_new_tokens=n, sampling=cfg.sampling,
                                   sticky_key="g7:2")

and gets :class:`GeneratedTurn` s back. The samples of a group share their prompt, so their first
turn is one :meth:`~TurnGenerator.generate_group` call (one HTTP request to SGLang); every
later turn, and every resume, is one :meth:`~TurnGenerator.generate` per sample, since the
samples' contexts diverge from the first generated token on. A generator with no group form
implements ``generate_group`` with :func:`generate_each`. The engine adapts the SGLang client
and fleet to this shape (routing by ``sticky_key`` for KV reuse across turns, deadlines,
bounded retries); its errors come from ``core/errors.py``: :class:`RequestRejected` (4xx),
:class:`EngineUnavailable`, :class:`GenerationError`.

Interrupts (docs/architecture.md §3): when a weight publication aborts running requests, the server
answers ``finish_reason == "abort"`` with the partial tokens generated so far.
:func:`generate_turn` keeps them, re-submits ``input_ids + partial`` with the remaining token
budget, and stitches the segments into one turn whose :class:`VersionSpan` s record which
weight version produced which tokens. It re-submits at most ``max_resumes`` times. A group's
first turn starts from the segment its group request returned (``first``): an aborted sample
resumes its own prefix on its own.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal, Protocol

import anyio
from msgspec import Struct

from nexrl_async.config.rollout import SamplingConfig
from nexrl_async.core.errors import GenerationError
from nexrl_async.core.records import VersionSpan

FinishReason = Literal["stop", "length", "abort"]


class GeneratedTurn(Struct, frozen=True, kw_only=True):
    """One answer of :meth:`TurnGenerator.generate`: the tokens generated after ``input_ids``.

    ``output_ids`` include the matched EOS / stop token (``no_stop_trim``); ``logprobs[i]`` is
    the server's log-prob of ``output_ids[i]``. ``finish_reason`` is ``"abort"`` when the request
    was interrupted (the partial output is valid and will be resumed). ``weight_version`` is
    the policy version of the weights that produced the tokens; when they changed mid-request
    (``in_place`` pauses), ``versions`` gives spans over ``output_ids`` (``[0, n)`` covered
    exactly, positions relative to this answer); empty means every token is ``weight_version``.
    ``server`` names the server that answered (for the ledger; optional).
    """

    output_ids: list[int]
    logprobs: list[float]
    finish_reason: FinishReason
    weight_version: int
    versions: list[VersionSpan] = []
    server: str = ""


class TurnGenerator(Protocol):
    """Generates one assistant turn's tokens from a token context."""

    async def generate(
        self,
        input_ids: list[int],
        *,
        max_new_tokens: int,
        sampling: SamplingConfig,
        sticky_key: str,
    ) -> GeneratedTurn:
        """Generate at most ``max_new_tokens`` tokens after ``input_ids``.

        ``sticky_key`` (``"<group_id>:<sample_index>"``) is stable for every turn and resume of
        one sample: route it to the same server while that server is healthy. Raises
        ``RequestRejected`` (4xx), ``EngineUnavailable`` (no server within the retry budget) or
        ``GenerationError`` (broken stream / payload). Never returns more than
        ``max_new_tokens`` tokens.
        """
        ...

    async def generate_group(
        self,
        input_ids: list[int],
        *,
        max_new_tokens: int,
        sampling: SamplingConfig,
        sticky_keys: Sequence[str],
    ) -> list[GeneratedTurn | Exception]:
        """One independent sample after the same ``input_ids`` for every key of ``sticky_keys``
        (one request where the server allows it); answer ``i`` belongs to ``sticky_keys[i]``.

        Answer ``i`` is a :class:`GeneratedTurn` under the :meth:`generate` contract (an aborted
        one carries its partial tokens; the caller resumes that sample alone with
        :meth:`generate`), or the error that sample alone met (only it fails). Later turns of
        key ``i`` should go to the server that answered it. Errors of the whole request are
        raised like :meth:`generate`'s (every sample of the group fails alike).
        """
        ...


async def generate_each(
    generator: TurnGenerator,
    input_ids: list[int],
    *,
    max_new_tokens: int,
    sampling: SamplingConfig,
    sticky_keys: Sequence[str],
) -> list[GeneratedTurn | Exception]:
    """:meth:`TurnGenerator.generate_group` as one :meth:`~TurnGenerator.generate` per key,
    run concurrently: for generators that have no group form. What a call raises is that
    sample's answer."""
    out: list[GeneratedTurn | Exception] = [GenerationError("no answer")] * len(sticky_keys)

    async def one(index: int, key: str) -> None:
        try:
            out[index] = await generator.generate(
                input_ids, max_new_tokens=max_new_tokens, sampling=sampling, sticky_key=key
            )
        except Exception as err:  # noqa: BLE001 - the sample's answer; its worker raises it
            out[index] = err

    async with anyio.create_task_group() as tg:
        for index, key in enumerate(sticky_keys):
            tg.start_soon(one, index, key)
    return out


class AssembledTurn(Struct, frozen=True, kw_only=True):
    """One finished assistant turn, stitched from one or more :class:`GeneratedTurn` segments.

    ``versions`` cover ``[0, len(output_ids))`` with turn-relative positions; ``resumes`` counts
    the re-submissions after aborts. ``finish_reason`` is ``"stop"`` or ``"length"``.
    """

    output_ids: list[int]
    logprobs: list[float]
    versions: list[VersionSpan]
    finish_reason: FinishReason
    resumes: int
    server: str

    @property
    def weight_version(self) -> int:
        """The oldest weight version that produced a token of this turn."""
        return min(span.version for span in self.versions)


async def generate_turn(
    generator: TurnGenerator,
    input_ids: list[int],
    *,
    max_new_tokens: int,
    sampling: SamplingConfig,
    sticky_key: str,
    max_resumes: int,
    first: GeneratedTurn | None = None,
) -> AssembledTurn:
    """Generate one turn, resuming after aborts, until ``stop`` or ``length``.

    ``first``: the turn's first segment when it is already generated (a group request's answer
    for this sample); only its resumes are requested here.

    Raises :class:`GenerationError` after more than ``max_resumes`` aborts, or when a segment
    breaks the :class:`GeneratedTurn` contract; errors of ``generator`` pass through.
    """
    ids: list[int] = []
    logprobs: list[float] = []
    versions: list[VersionSpan] = []
    resumes = 0
    while True:
        remaining = max_new_tokens - len(ids)
        if first is not None:
            seg, first = first, None
        else:
            seg = await generator.generate(
                input_ids + ids, max_new_tokens=remaining, sampling=sampling, sticky_key=sticky_key
            )
        _check_segment(seg, remaining)
        versions.extend(_shift(_segment_spans(seg), len(ids)))
        ids.extend(seg.output_ids)
        logprobs.extend(seg.logprobs)
        finish = seg.finish_reason
        if finish == "abort" and len(ids) >= max_new_tokens:
            finish = "length"
        if finish != "abort":
            break
        resumes += 1
        if resumes > max_resumes:
            raise GenerationError(
                f"generation aborted {resumes} times (max_resumes = {max_resumes}); "
                f"{len(ids)} of {max_new_tokens} tokens kept"
            )
    if not versions:  # no token at all: attribute the empty turn to the last answer's weights
        versions = [VersionSpan(start=0, end=0, version=seg.weight_version)]
    return AssembledTurn(
        output_ids=ids,
        logprobs=logprobs,
        versions=_merge(versions),
        finish_reason=finish,
        resumes=resumes,
        server=seg.server,
    )


def _check_segment(seg: GeneratedTurn, remaining: int) -> None:
    n = len(seg.output_ids)
    if n > remaining:
        raise GenerationError(f"server returned {n} tokens for max_new_tokens = {remaining}")
    if len(seg.logprobs) != n:
        raise GenerationError(f"server returned {len(seg.logprobs)} logprobs for {n} tokens")
    if seg.weight_version < 0:
        raise GenerationError(f"negative weight version {seg.weight_version}")
    if seg.versions and not _covers(seg.versions, n):
        raise GenerationError(f"version spans {seg.versions} do not cover the {n} output tokens")


def _covers(spans: list[VersionSpan], n: int) -> bool:
    """True when ``spans`` tile ``[0, n)`` in order without gaps or overlaps."""
    position = 0
    for span in spans:
        if span.start != position or span.end < span.start:
            return False
        position = span.end
    return position == n


def _segment_spans(seg: GeneratedTurn) -> list[VersionSpan]:
    n = len(seg.output_ids)
    if n == 0:
        return []
    if seg.versions:
        return [s for s in seg.versions if s.end > s.start]
    return [VersionSpan(start=0, end=n, version=seg.weight_version)]


def _shift(spans: list[VersionSpan], offset: int) -> list[VersionSpan]:
    return [
        VersionSpan(start=s.start + offset, end=s.end + offset, version=s.version) for s in spans
    ]


def _merge(spans: list[VersionSpan]) -> list[VersionSpan]:
    """Join adjacent spans of the same version."""
    merged: list[VersionSpan] = []
    for span in spans:
        last = merged[-1] if merged else None
        if last is not None and last.version == span.version and last.end == span.start:
            merged[-1] = VersionSpan(start=last.start, end=span.end, version=span.version)
        else:
            merged.append(span)
    return merged
