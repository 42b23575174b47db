"""vLLM's JSON on the wire (docs/vllm.md §3): our :class:`SamplingParams` → vLLM's, and
``/inference/v1/generate`` answers → :class:`GenerateResult` s.

Sampling keys are SGLang's (the engine's own vocabulary); each is mapped to vLLM's equivalent,
and a key vLLM has no equivalent for raises :class:`UnsupportedSampling` naming it, rather than
being dropped (vLLM ignores unknown keys silently, docs/vllm.md §3.1). Decoding is as strict as
SGLang's where training data is at stake: logprob entries must cover exactly the sampled tokens,
a finished choice must say why.
"""

from __future__ import annotations

from typing import Any

import msgspec
from msgspec import Struct

from nexrl_async.core.errors import GenerationError, InferenceError
from nexrl_async.inference.client.structs import (
    FinishReason,
    GenerateResult,
    SamplingParams,
    WeightVersionSpan,
)

SERVER_RID_PREFIX = "generate-tokens-"
"""``/inference/v1/generate`` runs request ``r`` as ``generate-tokens-r``: the id
``/abort_requests`` needs (docs/vllm.md §5)."""

_RENAMED = {
    "max_new_tokens": "max_tokens",
    "min_new_tokens": "min_tokens",
    "sampling_seed": "seed",
    "no_stop_trim": "include_stop_str_in_output",
}
"""SGLang key → vLLM key, same meaning."""
_SAME = (
    "temperature", "top_p", "top_k", "min_p", "frequency_penalty", "presence_penalty",
    "repetition_penalty", "stop", "stop_token_ids", "ignore_eos", "skip_special_tokens",
    "spaces_between_special_tokens", "n", "logit_bias", "stream_interval",
)  # fmt: skip
"""Keys vLLM's ``SamplingParams`` spells and means the same way (``top_k`` -1 = off in both)."""
_STRUCTURED = {"json_schema": "json", "regex": "regex", "ebnf": "grammar"}
"""Constrained decoding: SGLang key → key of vLLM's ``structured_outputs``."""
_UNSUPPORTED = {
    "stop_regex": "vLLM has no regex stop condition (use stop strings or stop_token_ids)",
    "custom_params": "vLLM has no per-request custom logit processor parameters",
}


class UnsupportedSampling(InferenceError, ValueError):
    """A sampling parameter the vLLM backend cannot express (raised before any request)."""


def vllm_sampling(sampling: SamplingParams, *, return_logprob: bool) -> dict[str, Any]:
    """vLLM ``sampling_params`` for ``sampling`` (unset keys stay unset: vLLM's defaults).

    ``return_logprob`` asks for the sampled token's log-prob only (``logprobs: 0``).
    """
    given = msgspec.structs.asdict(sampling)
    out: dict[str, Any] = {}
    structured: dict[str, Any] = {}
    for key, value in given.items():
        if value is None:
            continue
        if key in _UNSUPPORTED:
            raise UnsupportedSampling(f"sampling parameter {key!r}: {_UNSUPPORTED[key]}")
        if key in _STRUCTURED:
            structured[_STRUCTURED[key]] = value
        elif key in _RENAMED:
            out[_RENAMED[key]] = value
        elif key in _SAME:
            out[key] = value
        else:  # a field added to SamplingParams without a mapping here
            raise UnsupportedSampling(f"sampling parameter {key!r} has no vLLM mapping")
    if out.get("max_tokens") == 0:
        raise UnsupportedSampling(
            "sampling parameter 'max_new_tokens' = 0: vLLM generates at least one token"
        )
    if structured:
        out["structured_outputs"] = structured
    if return_logprob:
        out["logprobs"] = 0
    return out


class VLogprob(Struct, kw_only=True):
    token_id: int
    logprob: float | None = None


class VLogprobs(Struct, kw_only=True):
    content: list[VLogprob] | None = None


class VSpan(Struct, kw_only=True):
    version: str | int
    start: int
    end: int


class VChoice(Struct, kw_only=True):
    index: int = 0
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    token_ids: list[int] = []
    weight_versions: list[VSpan] | None = None
    logprobs: VLogprobs | None = None


class VUsage(Struct, kw_only=True):
    prompt_tokens: int | None = None


class VGenerate(Struct, kw_only=True):
    """One ``/inference/v1/generate`` answer (unknown keys ignored)."""

    request_id: str = ""
    choices: list[VChoice] = []
    usage: VUsage | None = None


_decoder = msgspec.json.Decoder(VGenerate)


def decode_generate(data: bytes) -> VGenerate:
    """An answer; garbled JSON is a :class:`GenerationError`."""
    try:
        return _decoder.decode(data)
    except msgspec.DecodeError as err:
        raise GenerationError(f"malformed /inference/v1/generate payload: {err}") from err


def choice_results(
    answer: VGenerate, n: int, *, return_logprob: bool
) -> list[GenerateResult | InferenceError]:
    """The ``n`` choices in sample order, each a result or the error decoding it met."""
    by_index = {choice.index: choice for choice in answer.choices}
    if sorted(by_index) != list(range(n)):
        raise GenerationError(
            f"expected choices 0..{n - 1}, got indexes {sorted(by_index)} ({answer.request_id})"
        )
    prompt_tokens = answer.usage.prompt_tokens if answer.usage is not None else None
    out: list[GenerateResult | InferenceError] = []
    for index in range(n):
        rid = answer.request_id if n == 1 else f"{answer.request_id}-{index}"
        try:
            result = choice_result(by_index[index], rid, prompt_tokens, return_logprob)
        except InferenceError as err:
            out.append(err)
        else:
            out.append(result)
    return out


def choice_result(
    choice: VChoice, rid: str, prompt_tokens: int | None, return_logprob: bool
) -> GenerateResult:
    """One finished (or aborted) choice → :class:`GenerateResult`."""
    ids = choice.token_ids
    logprobs: list[float] | None = None
    if return_logprob:
        logprobs = _logprobs(choice, ids)
    spans = [
        WeightVersionSpan(version=str(s.version), start=s.start, end=s.end)
        for s in choice.weight_versions or []
    ]
    return GenerateResult(
        rid=rid,
        output_ids=ids,
        output_logprobs=logprobs,
        finish_reason=_finish(choice),
        weight_version=spans[-1].version if spans else None,
        weight_versions=spans,
        prompt_tokens=prompt_tokens,
        completion_tokens=len(ids),
    )


def _logprobs(choice: VChoice, ids: list[int]) -> list[float]:
    content = choice.logprobs.content if choice.logprobs is not None else None
    if content is None:
        if not ids:  # aborted before its first token
            return []
        raise GenerationError("logprobs were requested but the choice has none")
    if [entry.token_id for entry in content] != ids:
        raise GenerationError(
            f"logprobs cover {len(content)} tokens that do not match token_ids ({len(ids)})"
        )
    values: list[float] = []
    for entry in content:
        if entry.logprob is None:
            raise GenerationError(f"null logprob for output token {entry.token_id}")
        values.append(float(entry.logprob))
    return values


def _finish(choice: VChoice) -> FinishReason:
    """vLLM's ``finish_reason`` / ``stop_reason`` → ours: EOS is ``stop`` matching the last
    token, a stop token or string is ``stop`` matching it, ``length`` carries the count."""
    reason = choice.finish_reason
    ids = choice.token_ids
    if reason == "length":
        return FinishReason(type="length", length=len(ids))
    if reason == "stop":
        matched = choice.stop_reason
        if matched is None and ids:
            matched = ids[-1]
        return FinishReason(type="stop", matched=matched)
    if reason == "abort":
        return FinishReason(type="abort", message="aborted")
    if reason is None:
        raise GenerationError("a choice of a finished answer has no finish_reason")
    raise GenerationError(f"unknown finish_reason {reason!r}")
