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
from nexrl_async.inference.local.sglang_schema import (
    SamplingParamsBody,
    length_error,
    min_new_error,
    range_error,
)
from nexrl_async.inference.local.step_plan import LogprobRequest
from nexrl_async.inference.staging import Layout


class GenerateRequest(Struct, kw_only=True):
    """``POST /generate`` body (unknown top-level keys are ignored, as in SGLang)."""

    text: str | list[str] | None = None
    input_ids: list[Any] | None = None
    input_embeds: Any = None
    sampling_params: SamplingParamsBody | list[SamplingParamsBody] | None = None
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


class UpdateWeightsFromSharedMemoryRequest(Struct, kw_only=True):
    """Our local server only: every weight from a staging file (inference/staging.py)."""

    layout: Layout
    weight_version: str | None = None
    in_place: bool = True
    """Swap between two decode steps with requests running (else wait until idle or paused)."""


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


class ContinueRequest(Struct, kw_only=True):
    torch_empty_cache: bool = True


class AbortRequest(Struct, kw_only=True):
    rid: str = ""
    abort_all: bool = False


@dataclass(frozen=True, kw_only=True)
class Limits:
    """What the served model allows, and what one request may ask of the server."""

    context_length: int
    vocab_size: int
    max_n: int = 64
    """Largest ``sampling_params.n`` (``--max-n``)."""
    max_sequences: int = 4096
    """Most sequences (prompts x ``n``) in one request (``--max-request-sequences``)."""
    chars_per_token: int = 64
    """Most characters one token can stand for (the longest vocabulary entry): a text longer
    than ``context_length * chars_per_token`` cannot fit and is refused before tokenizing."""


def check_counts(prompts: int, n: int, limits: Limits) -> None:
    """Refuse an ``n`` or a number of sequences over the server's caps (before any work)."""
    if n > limits.max_n:
        raise RequestRejected(400, f"n must be at most {limits.max_n}, got {n}.")
    if prompts * n > limits.max_sequences:
        raise RequestRejected(
            400,
            f"A request may ask for at most {limits.max_sequences} sequences (prompts x n), "
            f"got {prompts * n}.",
        )


def check_text_length(texts: list[str], limits: Limits) -> None:
    """Refuse, before tokenizing, a text too long to fit the context whatever its tokens."""
    bound = limits.context_length * limits.chars_per_token
    for text in texts:
        if len(text) > bound:
            raise RequestRejected(
                400,
                f"The input ({len(text)} characters) is longer than the model's context length "
                f"({limits.context_length} tokens) can hold; texts over {bound} characters are "
                "not tokenized.",
            )


def _unsupported(params: SamplingParamsBody) -> str | None:
    for name in ("json_schema", "regex", "ebnf", "structural_tag", "stop_regex"):
        if getattr(params, name) is not None:
            return name
    if params.beam_width is not None and params.beam_width > 1:
        return "beam_width"
    return None


def _check_length(prompt_len: int, max_new: int | None, limits: Limits) -> int:
    """SGLang's context checks; returns the effective ``max_new_tokens``."""
    message = length_error(prompt_len, max_new, limits.context_length)
    if message is not None:
        raise RequestRejected(400, message)
    return limits.context_length - prompt_len if max_new is None else max_new


def sampling_spec(p: SamplingParamsBody, prompt_len: int, limits: Limits) -> SamplingSpec:
    """Validate ``p`` for a prompt of ``prompt_len`` tokens (raises ``RequestRejected``)."""
    feature = _unsupported(p)
    if feature is not None:
        raise RequestRejected(400, f"{feature} is not supported by the nexrl_async local server.")
    message = range_error(p)
    if message is not None:
        raise RequestRejected(400, message)
    max_new = _check_length(prompt_len, p.max_new_tokens, limits)
    message = min_new_error(p.min_new_tokens, max_new)
    if message is not None:
        raise RequestRejected(400, message)
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
