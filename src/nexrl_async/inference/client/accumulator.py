"""Turns SGLang's streamed ``/generate`` events into deltas, whatever the server's stream mode.

SGLang streams are *cumulative* by default (every event repeats all output ids and logprobs so
far) and *incremental* with ``--incremental-streaming-output`` (each event carries only what is
new); some releases mixed the two per field (docs/sglang_api.md §2.7). In ``auto`` mode each field
is classified on every event from ``meta_info.completion_tokens`` (the total so far): a field whose
length equals the total is cumulative, one whose length equals ``total - seen`` is a delta (the
two coincide only on the first event, where they mean the same). Without a total, a field that
starts with the tokens already seen is taken as cumulative. At the end the accumulated ids must
match the final ``completion_tokens``.
"""

from __future__ import annotations

from collections.abc import Sequence

from nexrl_async.core.errors import GenerationError
from nexrl_async.inference.client.structs import GenerateResult, StreamChunk, StreamMode
from nexrl_async.inference.client.wire import (
    WireGenerate,
    build_result,
    decode_event,
    logprob_values,
    raise_error_event,
    version_label,
)


def delta_offset(
    seq: Sequence[int], seen: Sequence[int], total: int | None, mode: StreamMode
) -> int:
    """Index in ``seq`` where the new items start (0 for a delta, ``len(seen)`` if cumulative)."""
    n, k = len(seq), len(seen)
    if mode == "auto":
        mode = _classify(seq, seen, total)
    if mode == "incremental":
        return 0
    if n < k or list(seq[:k]) != list(seen):
        raise GenerationError(
            f"cumulative stream event with {n} tokens disagrees with the {k} already received"
        )
    return k


def _classify(seq: Sequence[int], seen: Sequence[int], total: int | None) -> StreamMode:
    n, k = len(seq), len(seen)
    if k == 0:
        return "incremental"
    if total is not None:
        if n == total:
            return "cumulative"
        if n == total - k:
            return "incremental"
    if n >= k and list(seq[:k]) == list(seen):
        return "cumulative"
    return "incremental"


class StreamAccumulator:
    """Feed it each event's JSON; it returns the :class:`StreamChunk` delta and, once the server
    reports a finish reason, the final :class:`GenerateResult`."""

    def __init__(self, *, return_logprob: bool, mode: StreamMode = "auto") -> None:
        self._return_logprob = return_logprob
        self._mode: StreamMode = mode
        self._ids: list[int] = []
        self._lp_ids: list[int] = []
        self._logprobs: list[float] = []
        self._text: str | None = None
        self._text_mode: StreamMode = mode
        self.result: GenerateResult | None = None
        self.server_done = False
        """The server ended the request: it sent the final event or an error event."""

    @property
    def token_ids(self) -> list[int]:
        """Every output id received so far."""
        return list(self._ids)

    def feed(self, data: str) -> StreamChunk:
        """One event's data (not ``[DONE]``) → its delta."""
        wire = decode_event(data)
        if wire.error is not None:
            self.server_done = True
            raise_error_event(wire.error)
        if self.result is not None:
            raise GenerationError("stream continued after its final event")
        meta = wire.meta_info
        if meta is None:
            raise GenerationError("stream event lacks meta_info")
        if wire.index not in (None, 0):
            raise GenerationError(f"unexpected stream index {wire.index} for a single request")
        total = meta.completion_tokens
        new_ids = self._new_ids(wire, total)
        new_logprobs = self._new_logprobs(wire, total, new_ids)
        new_text = self._new_text(wire.text, cumulative_ids=len(wire.output_ids or []) == total)
        final: GenerateResult | None = None
        if meta.finish_reason is not None:
            self.server_done = True
            final = build_result(
                meta,
                ids=list(self._ids),
                logprobs=list(self._logprobs) if self._return_logprob else None,
                text=self._text,
            )
            self.result = final
        return StreamChunk(
            token_ids=new_ids,
            logprobs=new_logprobs,
            text=new_text,
            completion_tokens=len(self._ids),
            weight_version=version_label(meta.weight_version),
            finish_reason=final.finish_reason if final else None,
            final=final,
        )

    def _new_ids(self, wire: WireGenerate, total: int | None) -> list[int]:
        seq = wire.output_ids
        if seq is None:
            entries = (wire.meta_info.output_token_logprobs if wire.meta_info else None) or []
            seq = [entry[1] for entry in entries]
        new = seq[delta_offset(seq, self._ids, total, self._mode) :]
        self._ids.extend(new)
        return new

    def _new_logprobs(
        self, wire: WireGenerate, total: int | None, new_ids: list[int]
    ) -> list[float] | None:
        if not self._return_logprob:
            return None
        assert wire.meta_info is not None
        entries = wire.meta_info.output_token_logprobs
        if entries is None:
            if new_ids:
                raise GenerationError("stream event with new tokens but no logprobs")
            return []
        seq = [entry[1] for entry in entries]
        new_entries = entries[delta_offset(seq, self._lp_ids, total, self._mode) :]
        values = logprob_values(new_entries, new_ids)
        self._lp_ids.extend(new_ids)
        self._logprobs.extend(values)
        return values

    def _new_text(self, text: str | None, *, cumulative_ids: bool) -> str | None:
        """Text follows the ids' mode, except that older builds streamed delta ids with
        cumulative text: with delta ids, the first event after some text decides (for the rest
        of the stream) by whether it repeats all the text so far. Best effort by design."""
        if text is None:
            return None
        previous = self._text or ""
        if self._text_mode == "auto" and previous:
            if cumulative_ids or self._mode == "cumulative":
                self._text_mode = "cumulative"
            else:
                repeats = self._mode == "auto" and text.startswith(previous)
                self._text_mode = "cumulative" if repeats else "incremental"
        if self._text_mode == "cumulative" or (not previous and self._text_mode == "auto"):
            self._text = text
            return text[len(previous) :] if text.startswith(previous) else text
        self._text = previous + text
        return text
