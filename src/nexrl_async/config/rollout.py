"""Recipe sections ``[rollout]``, ``[pool]`` and ``[staleness]``."""

from __future__ import annotations

from typing import Annotated, Literal

from msgspec import Meta, Struct

from nexrl_async.config.types import (
    Concurrency,
    GroupSize,
    NonNegFloat,
    PosFloat,
    PosInt,
    Probability,
    RefStr,
    TokenCount,
)

TopP = Annotated[float, Meta(gt=0.0, le=1.0)]


class SamplingConfig(Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Sampling parameters sent with every generate request (SGLang names)."""

    temperature: NonNegFloat = 1.0
    """Softmax temperature; 0 is greedy."""
    top_p: TopP = 1.0
    """Nucleus sampling mass, in (0, 1]."""
    top_k: int = -1
    """Keep the k most likely tokens; -1 disables."""
    min_p: Probability = 0.0
    """Drop tokens below ``min_p`` times the most likely token's probability."""
    stop: list[str] = []
    """Stop strings."""
    stop_token_ids: list[int] = []
    """Stop token ids (in addition to EOS)."""
    ignore_eos: bool = False
    """Keep generating past EOS."""


class RolloutConfig(Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Rollout workers: concurrency, agent loop limits, user code."""

    evaluator: RefStr
    """``file.py:Name`` of the evaluator (a class with ``evaluate(item, trajectory)``)."""
    workers: Concurrency = 8
    """Concurrent rollout worker tasks (each runs one group at a time)."""
    group_size: GroupSize = 4
    """Samples per data item (the GRPO group)."""
    max_turns: PosInt = 1
    """Assistant turns per sample; 1 is single-turn."""
    max_new_tokens: TokenCount = 256
    """Generated tokens per turn."""
    max_total_tokens: PosInt | None = None
    """Cap on prompt + all turns; defaults to the model's context length."""
    worker: RefStr | None = None
    """``file.py:Name`` of a custom worker class (hooks ``format_query``, ``loss_mask``)."""
    tools: list[RefStr] = []
    """``file.py:function`` async tools offered to the model."""
    sandbox: Literal["namespaces", "rlimits"] = "namespaces"
    """Isolation of the ready ``nexrl_async.rollout.sandbox:python`` tool: ``namespaces`` (its
    own user, PID, mount and network namespaces through bubblewrap; ``check`` refuses the
    recipe where that is not available) or ``rlimits`` (resource limits only: the program can
    read and write what the engine can, and reach the network)."""
    apply_chat_template: bool = True
    """Render messages with the tokenizer's chat template (else concatenate contents)."""
    train_turns: Literal["all", "last"] = "all"
    """Assistant turns the loss covers (the default ``loss_mask`` hook): ``all`` of a sample's
    assistant turns, or only the ``last`` (earlier ones keep loss mask 0). Same rule for RL
    samples and multi-turn SFT demonstrations."""
    check_transcript: bool = False
    """Re-render every finished sample's whole conversation with the chat template and fail
    the sample (``format_error``) unless its token ids are a prefix of that rendering: the
    token-exact check of ``rollout/transcript.py`` (one more render per sample; needs
    ``apply_chat_template``)."""
    system_prompt: str | None = None
    """System message prepended to every query."""
    prompt_field: str = "prompt"
    """Item field holding the prompt (a string or a list of chat messages)."""
    sample_timeout_s: PosFloat = 60.0
    """Wall-clock budget of one sample (all its turns, tools and scoring); past it the sample
    fails as ``timeout`` (a stuck sync evaluator is abandoned: the process still exits)."""
    sampling: SamplingConfig = SamplingConfig()
    """Sampling parameters."""
