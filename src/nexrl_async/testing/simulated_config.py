"""Settings of the simulated SGLang server (``python -m nexrl_async.testing.simulated``)."""

from __future__ import annotations

from typing import Annotated, Literal

from msgspec import Meta, Struct

StreamOutput = Literal["cumulative", "incremental", "mixed"]


class SimulatedConfig(Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """How the simulated server behaves. Defaults: instant tokens, SGLang 0.5.23 shapes."""

    model_path: str = "simulated-model"
    """Reported as ``model_path`` / ``served_model_name`` until a disk update replaces it."""
    vocab_size: Annotated[int, Meta(ge=2)] = 32000
    """Token ids are drawn from ``[0, vocab_size)``."""
    eos_token_id: Annotated[int, Meta(ge=0)] = 2
    """Ends every natural completion (``finish_reason`` stop, ``matched`` this id)."""
    context_length: Annotated[int, Meta(ge=2)] = 8192
    """Prompt + ``max_new_tokens`` beyond this is a 400, as in SGLang."""
    seed: int = 0
    """Seeds the per-request plans (ids, logprobs, lengths)."""
    token_latency_s: Annotated[float, Meta(ge=0.0)] = 0.0
    """Seconds between two tokens of one request (0: as fast as the loop goes)."""
    prefill_latency_s: Annotated[float, Meta(ge=0.0)] = 0.0
    """Extra delay before a request's first token."""
    mean_output_tokens: Annotated[float, Meta(gt=0.0)] = 64.0
    """Median natural output length (log-normal; capped by ``max_new_tokens``)."""
    output_tokens_sigma: Annotated[float, Meta(ge=0.0)] = 1.0
    """Log-normal sigma of output lengths: 0 = fixed length, 1 = long tail."""
    stream_output: StreamOutput = "cumulative"
    """SSE chunk semantics: SGLang's default ``cumulative``, ``incremental``
    (``--incremental-streaming-output``) or ``mixed`` (older builds: incremental ids,
    cumulative text and logprobs)."""
    stream_interval: Annotated[int, Meta(ge=1)] = 1
    """Tokens per streamed chunk unless the request sets ``stream_interval``."""
    weight_version: str = "default"
    """Initial weight version label (SGLang's ``--weight-version``)."""
    api_key: str | None = None
    """Require ``Authorization: Bearer <key>`` on every non-health route."""
    legacy: bool = False
    """Behave like the SGLang builds RL stacks pin (≤ 0.5.15): no ``/model_info`` and
    ``/server_info`` (only the ``get_`` forms), no ``begin/end_weight_update``, no
    ``weight_versions`` spans in ``meta_info``."""
    return_text: bool = True
    """Include ``text`` (``<id>`` per token); False mimics ``--skip-tokenizer-init``."""
