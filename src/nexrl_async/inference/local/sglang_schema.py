"""SGLang's ``sampling_params`` schema and its value and length checks, as a server applies them.

One definition for both servers that speak SGLang's native API (the local server and the
simulated one), so their schemas and error messages cannot drift apart. Messages are SGLang's
(docs/sglang_api.md §2.2 and §8); callers answer them with a 400.
"""

from __future__ import annotations

import math
from typing import Any

from msgspec import Struct


class SamplingParamsBody(Struct, kw_only=True, forbid_unknown_fields=True):
    """Every ``sampling_params`` key SGLang accepts, with its defaults; others are rejected."""

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


def range_error(p: SamplingParamsBody) -> str | None:
    """SGLang's message for the first value out of its range, or ``None``.

    ``min_new_tokens`` is checked against the effective ``max_new_tokens`` by the caller, once
    the context length is known.
    """
    checks: list[tuple[bool, str, Any]] = [
        (math.isfinite(p.temperature) and p.temperature >= 0.0,
         "temperature must be non-negative", p.temperature),
        (0.0 < p.top_p <= 1.0, "top_p must be in (0, 1]", p.top_p),
        (0.0 <= p.min_p <= 1.0, "min_p must be in [0, 1]", p.min_p),
        (-2.0 <= p.frequency_penalty <= 2.0, "frequency_penalty must be in [-2, 2]",
         p.frequency_penalty),
        (-2.0 <= p.presence_penalty <= 2.0, "presence_penalty must be in [-2, 2]",
         p.presence_penalty),
        (0.0 < p.repetition_penalty <= 2.0, "repetition_penalty must be in (0, 2]",
         p.repetition_penalty),
        (p.top_k == -1 or p.top_k >= 1, "top_k must be -1 (disable) or at least 1", p.top_k),
        (p.max_new_tokens is None or p.max_new_tokens >= 0, "max_new_tokens must be at least 0",
         p.max_new_tokens),
        (p.n >= 1, "n must be at least 1", p.n),
        (p.stream_interval is None or p.stream_interval >= 1,
         "stream_interval must be at least 1", p.stream_interval),
    ]  # fmt: skip
    for ok, message, value in checks:
        if not ok:
            return f"{message}, got {value}."
    return None


def length_error(prompt_len: int, max_new: int | None, context: int) -> str | None:
    """SGLang's message when a prompt, or prompt plus ``max_new`` tokens, exceeds ``context``."""
    if prompt_len >= context:
        return (
            f"The input ({prompt_len} tokens) is longer than the model's context length "
            f"({context} tokens)."
        )
    if max_new is not None and prompt_len + max_new > context:
        return (
            f"Requested token count exceeds the model's maximum context length of {context} "
            f"tokens. You requested a total of {prompt_len + max_new} tokens: {prompt_len} tokens "
            f"from the input messages and {max_new} tokens for the completion. Please reduce the "
            "number of tokens in the input messages or the completion to fit within the limit."
        )
    return None


def min_new_error(min_new: int, max_new: int) -> str | None:
    """SGLang's message when ``min_new_tokens`` is outside ``[0, max_new_tokens]``."""
    if 0 <= min_new <= max_new:
        return None
    return f"min_new_tokens must be in [0, max_new_tokens], got {min_new}."
