"""SGLang's JSON on the wire → typed results, and error bodies → the server's message.

Decoding is strict where it protects training data (output ids and logprob ids must agree, a
finished response must say why it finished) and lenient elsewhere (unknown keys are ignored:
SGLang adds ``meta_info`` keys in most releases).
"""

from __future__ import annotations

from typing import Any, NoReturn

import msgspec
from msgspec import Struct

from nexrl_async.core.errors import EngineUnavailable, GenerationError, RequestRejected
from nexrl_async.inference.client.structs import FinishReason, GenerateResult, WeightVersionSpan

_FINISH_TYPES = ("stop", "length", "abort")

LogprobEntry = tuple[float | None, int, str | None]
"""SGLang's ``[logprob, token_id, text]`` (text only with ``return_text_in_logprobs``)."""


class WireFinish(Struct, kw_only=True):
    type: str
    matched: int | str | None = None
    length: int | None = None
    message: str | None = None
    status_code: int | None = None


class WireSpan(Struct, kw_only=True):
    version: str | int
    start: int
    end: int


class WireMeta(Struct, kw_only=True):
    id: str = ""
    finish_reason: WireFinish | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    cached_tokens: int | None = None
    weight_version: str | int | None = None
    weight_versions: list[WireSpan] | None = None
    output_token_logprobs: list[LogprobEntry] | None = None
    e2e_latency: float | None = None


class WireError(Struct, kw_only=True):
    message: str = ""
    type: str | None = None
    code: int | str | None = None
    retryable: bool | None = None


class WireGenerate(Struct, kw_only=True):
    """One ``/generate`` response object, one streamed event, or an in-stream error event."""

    text: str | None = None
    output_ids: list[int] | None = None
    meta_info: WireMeta | None = None
    index: int | None = None
    error: WireError | str | None = None


_decoder = msgspec.json.Decoder(WireGenerate)
_batch_decoder = msgspec.json.Decoder(list[WireGenerate])


def error_message(body: bytes, fallback: str) -> str:
    """The human message in any of SGLang's error bodies (docs/sglang_api.md §7), else the raw text.

    Handles ``{"error": "..."}``, ``{"error": {"message": ...}}``, the OpenAI-style envelope
    ``{"object": "error", "message": ...}``, ``{"success": false, "message": ...}``,
    FastAPI's ``{"detail": ...}`` and plain text.
    """
    text = body.decode("utf-8", errors="replace").strip()
    try:
        obj: Any = msgspec.json.decode(body)
    except msgspec.DecodeError:
        return text or fallback
    if isinstance(obj, dict):
        err = obj.get("error")
        if isinstance(err, str) and err:
            return err
        if isinstance(err, dict) and isinstance(err.get("message"), str):
            return str(err["message"])
        for key in ("message", "detail", "error_message"):
            value = obj.get(key)
            if isinstance(value, str) and value:
                return value
            if value:
                return str(value)
    if isinstance(obj, str) and obj:
        return obj
    return fallback if obj is None else text or fallback


def raise_error_event(error: WireError | str) -> NoReturn:
    """An in-stream ``{"error": ...}`` event: 4xx codes are rejections, the rest stream errors."""
    if isinstance(error, str):
        raise GenerationError(f"server sent an error event: {error}")
    if isinstance(error.code, int) and 400 <= error.code < 500:
        raise RequestRejected(error.code, error.message)
    raise GenerationError(f"server sent an error event (code {error.code}): {error.message}")


def decode_event(data: str | bytes) -> WireGenerate:
    """One response object or streamed event; garbled JSON is a :class:`GenerationError`."""
    try:
        return _decoder.decode(data)
    except msgspec.DecodeError as err:
        raise GenerationError(f"malformed /generate payload: {err}") from err


def decode_batch(data: bytes) -> list[WireGenerate]:
    """A batch / ``n > 1`` response (a JSON list, prompt-major)."""
    try:
        return _batch_decoder.decode(data)
    except msgspec.DecodeError as err:
        raise GenerationError(f"malformed batch /generate payload: {err}") from err


def finish_reason(wire: WireFinish) -> FinishReason:
    """Typed finish reason; an abort carrying an HTTP status ≥ 400 becomes that error."""
    if wire.type not in _FINISH_TYPES:
        raise GenerationError(f"unknown finish_reason type {wire.type!r}")
    status = wire.status_code
    if wire.type == "abort" and status is not None and status >= 400:
        message = wire.message or "aborted by the server"
        if status < 500:
            raise RequestRejected(status, message)
        raise EngineUnavailable(f"HTTP {status}: {message}")
    return FinishReason(
        type=wire.type,  # type: ignore[arg-type]  # checked against _FINISH_TYPES above
        matched=wire.matched,
        length=wire.length,
        message=wire.message,
        status_code=status,
    )


def logprob_values(entries: list[LogprobEntry], ids: list[int]) -> list[float]:
    """Logprobs of ``entries``, checked to be numbers for exactly the tokens ``ids``."""
    if [entry[1] for entry in entries] != ids:
        raise GenerationError(
            f"output_token_logprobs cover {len(entries)} tokens that do not match output_ids "
            f"({len(ids)} tokens)"
        )
    values: list[float] = []
    for logprob, token_id, _ in entries:
        if logprob is None:
            raise GenerationError(f"null logprob for output token {token_id}")
        values.append(float(logprob))
    return values


def version_label(value: str | int | None) -> str | None:
    """SGLang reports versions as strings; a patched server may send an int."""
    return None if value is None else str(value)


def to_result(wire: WireGenerate, *, return_logprob: bool) -> GenerateResult:
    """A finished non-stream response → :class:`GenerateResult`."""
    if wire.error is not None:
        raise_error_event(wire.error)
    meta = wire.meta_info
    if meta is None or meta.finish_reason is None:
        raise GenerationError("/generate response lacks meta_info.finish_reason")
    entries = meta.output_token_logprobs
    ids = wire.output_ids
    if ids is None:
        if entries is None and meta.completion_tokens:
            raise GenerationError("/generate response has neither output_ids nor logprobs")
        ids = [entry[1] for entry in entries or []]
    logprobs: list[float] | None = None
    if return_logprob:
        if entries is None:
            raise GenerationError("return_logprob was set but the response has no logprobs")
        logprobs = logprob_values(entries, ids)
    return build_result(meta, ids=ids, logprobs=logprobs, text=wire.text)


def build_result(
    meta: WireMeta,
    *,
    ids: list[int],
    logprobs: list[float] | None,
    text: str | None,
) -> GenerateResult:
    """Assemble a result from checked ids/logprobs and the final ``meta_info``."""
    assert meta.finish_reason is not None  # callers check it
    if meta.completion_tokens is not None and meta.completion_tokens != len(ids):
        raise GenerationError(
            f"completion_tokens={meta.completion_tokens} but {len(ids)} output ids arrived"
        )
    spans = [
        WeightVersionSpan(version=str(s.version), start=s.start, end=s.end)
        for s in meta.weight_versions or []
    ]
    return GenerateResult(
        rid=meta.id,
        output_ids=ids,
        output_logprobs=logprobs,
        finish_reason=finish_reason(meta.finish_reason),
        weight_version=version_label(meta.weight_version),
        weight_versions=spans,
        prompt_tokens=meta.prompt_tokens,
        completion_tokens=len(ids),
        cached_tokens=meta.cached_tokens,
        text=text,
        e2e_latency_s=meta.e2e_latency,
    )
