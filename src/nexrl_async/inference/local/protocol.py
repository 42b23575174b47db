"""Request bodies of the native SGLang API, and their validation into scheduler requests.

Decoding follows SGLang 0.5.23's schema gate: unknown top-level keys are ignored, unknown keys
inside ``sampling_params`` and wrong types are rejected. Value checks raise
``RequestRejected(400, <SGLang's message>)``. Features the local server does not implement
(grammars, regex stops, beams, LoRA, embeddings, sessions) are rejected with a 400 that says so
rather than silently ignored.
"""

from __future__ import annotations

import math
import uuid
from dataclasses import dataclass
from typing import Any, Literal

from msgspec import Struct

from nexrl_async.core.errors import RequestRejected
from nexrl_async.inference.local.sampling import SamplingSpec
from nexrl_async.inference.local.step import LogprobRequest


class SamplingParams(Struct, kw_only=True, forbid_unknown_fields=True):
    """SGLang ``sampling_params`` (all keys SGLang accepts; see SGLANG_API.md §2.2)."""

    max_new_tokens: int | None = 128
    min_new_tokens: int = 0
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    min_p: float = 0.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    repetition_penalty: float = 1.0
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    stop_regex: str | list[str] | None = None
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    no_stop_trim: bool = False
    n: int = 1
    json_schema: str | None = None
    regex: str | None = None
    ebnf: str | None = None
    structural_tag: str | None = None
    logit_bias: dict[str, float] | None = None
    sampling_seed: int | None = None
    stream_interval: int | None = None
    custom_params: dict[str, Any] | None = None
    beam_width: int | None = None


class GenerateRequest(Struct, kw_only=True):
    """``POST /generate`` body (unknown top-level keys are ignored, as in SGLang)."""

    text: str | list[str] | None = None
    input_ids: list[Any] | None = None
    input_embeds: Any = None
    sampling_params: SamplingParams | list[SamplingParams] | None = None
    rid: str | list[str] | None = None
    stream: bool = False
    return_logprob: bool | list[bool] = False
    logprob_start_len: int | list[int] = -1
    top_logprobs_num: int | list[int] = 0
    token_ids_logprob: list[Any] | None = None
    return_text_in_logprobs: bool = False
    return_prompt_token_ids: bool = False
    lora_path: str | list[str | None] | None = None
    session_params: dict[str, Any] | None = None


class UpdateWeightsFromDiskRequest(Struct, kw_only=True):
    model_path: str
    load_format: str | None = None
    abort_all_requests: bool = False
    weight_version: str | None = None
    flush_cache: bool = True
    torch_empty_cache: bool = False


class InitWeightsUpdateGroupRequest(Struct, kw_only=True):
    master_address: str
    master_port: int | str  # AReaL sends it as a string
    rank_offset: int
    world_size: int
    group_name: str = "weight_update_group"
    backend: str = "nccl"


class UpdateWeightsFromDistributedRequest(Struct, kw_only=True):
    names: list[str]
    dtypes: list[str]
    shapes: list[list[int]]
    group_name: str = "weight_update_group"
    flush_cache: bool = True
    abort_all_requests: bool = False
    weight_version: str | None = None
    load_format: str | None = None
    selector: str = "all"
    torch_empty_cache: bool = False


class GroupNameRequest(Struct, kw_only=True):
    group_name: str = "weight_update_group"


class BeginWeightUpdateRequest(Struct, kw_only=True):
    selector: str = "all"


class PauseRequest(Struct, kw_only=True):
    mode: Literal["abort", "retract", "in_place"] = "abort"


class AbortRequest(Struct, kw_only=True):
    rid: str = ""
    abort_all: bool = False


@dataclass(frozen=True, kw_only=True)
class Limits:
    """What the served model allows."""

    context_length: int
    vocab_size: int


def _unsupported(params: SamplingParams) -> str | None:
    for name in ("json_schema", "regex", "ebnf", "structural_tag", "stop_regex"):
        if getattr(params, name) is not None:
            return name
    if params.beam_width is not None and params.beam_width > 1:
        return "beam_width"
    return None


def _check_ranges(p: SamplingParams) -> None:
    checks = [
        (math.isfinite(p.temperature) and p.temperature >= 0.0, "temperature must be non-negative"),
        (0.0 < p.top_p <= 1.0, "top_p must be in (0, 1]"),
        (0.0 <= p.min_p <= 1.0, "min_p must be in [0, 1]"),
        (-2.0 <= p.frequency_penalty <= 2.0, "frequency_penalty must be in [-2, 2]"),
        (-2.0 <= p.presence_penalty <= 2.0, "presence_penalty must be in [-2, 2]"),
        (0.0 < p.repetition_penalty <= 2.0, "repetition_penalty must be in (0, 2]"),
    ]
    values = [p.temperature, p.top_p, p.min_p, p.frequency_penalty, p.presence_penalty]
    values.append(p.repetition_penalty)
    for (ok, message), value in zip(checks, values, strict=True):
        if not ok:
            raise RequestRejected(400, f"{message}, got {value}.")
    if p.top_k == 0 or p.top_k < -1:
        raise RequestRejected(400, f"top_k must be -1 (disable) or at least 1, got {p.top_k}.")
    if p.max_new_tokens is not None and p.max_new_tokens < 0:
        raise RequestRejected(400, f"max_new_tokens must be at least 0, got {p.max_new_tokens}.")
    if p.n < 1:
        raise RequestRejected(400, f"n must be at least 1, got {p.n}.")
    if p.stream_interval is not None and p.stream_interval < 1:
        raise RequestRejected(400, f"stream_interval must be at least 1, got {p.stream_interval}.")


def _check_length(prompt_len: int, max_new: int | None, limits: Limits) -> int:
    """SGLang's context checks; returns the effective ``max_new_tokens``."""
    ctx = limits.context_length
    if prompt_len >= ctx:
        raise RequestRejected(
            400,
            f"The input ({prompt_len} tokens) is longer than the model's context length "
            f"({ctx} tokens).",
        )
    if max_new is None:
        return ctx - prompt_len
    if prompt_len + max_new > ctx:
        raise RequestRejected(
            400,
            f"Requested token count exceeds the model's maximum context length of {ctx} tokens. "
            f"You requested a total of {prompt_len + max_new} tokens: {prompt_len} tokens from "
            f"the input messages and {max_new} tokens for the completion. Please reduce the "
            "number of tokens in the input messages or the completion to fit within the limit.",
        )
    return max_new


def sampling_spec(p: SamplingParams, prompt_len: int, limits: Limits) -> SamplingSpec:
    """Validate ``p`` for a prompt of ``prompt_len`` tokens (raises ``RequestRejected``)."""
    feature = _unsupported(p)
    if feature is not None:
        raise RequestRejected(400, f"{feature} is not supported by the nexrl_async local server.")
    _check_ranges(p)
    max_new = _check_length(prompt_len, p.max_new_tokens, limits)
    if not 0 <= p.min_new_tokens <= max_new:
        raise RequestRejected(
            400, f"min_new_tokens must be in [0, max_new_tokens], got {p.min_new_tokens}."
        )
    stops = [p.stop] if isinstance(p.stop, str) else list(p.stop or [])
    if len(stops) > 32:
        raise RequestRejected(400, "stop must have at most 32 entries.")
    bias: dict[int, float] = {}
    for key, value in (p.logit_bias or {}).items():
        token = int(key) if key.isdigit() else -1
        if not 0 <= token < limits.vocab_size:
            raise RequestRejected(400, f"logit_bias token id {key} is out of range.")
        if not math.isfinite(value):
            raise RequestRejected(400, f"logit_bias values must be finite, got {value}.")
        bias[token] = float(value)
    seed = p.sampling_seed
    if seed is not None and not -(2**63) <= seed < 2**64:
        raise RequestRejected(400, f"sampling_seed must fit in 64 bits, got {seed}.")
    bad_ids = [t for t in p.stop_token_ids or [] if not 0 <= t < limits.vocab_size]
    if bad_ids:
        raise RequestRejected(400, f"stop_token_ids out of range: {bad_ids}.")
    return SamplingSpec(
        max_new_tokens=max_new,
        min_new_tokens=p.min_new_tokens,
        temperature=p.temperature,
        top_p=p.top_p,
        top_k=p.top_k,
        min_p=p.min_p,
        frequency_penalty=p.frequency_penalty,
        presence_penalty=p.presence_penalty,
        repetition_penalty=p.repetition_penalty,
        stop=tuple(s for s in stops if s),
        stop_token_ids=frozenset(p.stop_token_ids or ()),
        ignore_eos=p.ignore_eos,
        skip_special_tokens=p.skip_special_tokens,
        no_stop_trim=p.no_stop_trim,
        logit_bias=bias,
        sampling_seed=p.sampling_seed,
    )


def check_prompt(ids: list[Any], limits: Limits) -> list[int]:
    """A prompt's token ids: a non-empty list of ints inside the vocabulary."""
    if not ids:
        raise RequestRejected(400, "input_ids cannot be empty.")
    if not all(isinstance(t, int) and not isinstance(t, bool) for t in ids):
        raise RequestRejected(400, "input_ids must be a list of ints or a list of lists of ints.")
    if not all(0 <= t < limits.vocab_size for t in ids):
        raise RequestRejected(400, "input_ids contain a token id outside the vocabulary.")
    return list(ids)


def logprob_request(
    enabled: bool,
    start: int,
    top_n: int,
    token_ids: list[Any] | None,
    prompt_len: int,
    limits: Limits,
) -> LogprobRequest:
    if not enabled:
        return LogprobRequest()
    if top_n < 0:
        raise RequestRejected(400, f"top_logprobs_num must be non-negative, got {top_n}.")
    if token_ids is not None:
        check_prompt(token_ids, limits)  # same rules: ints inside the vocabulary
    if start >= prompt_len:
        raise RequestRejected(
            400,
            f"logprob_start_len ({start}) must be smaller than the input length ({prompt_len}).",
        )
    return LogprobRequest(
        enabled=True, top_n=top_n, token_ids=tuple(token_ids or ()), input_start=max(start, -1)
    )


def new_rid() -> str:
    return uuid.uuid4().hex
