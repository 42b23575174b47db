"""Token selection for one decode step of the whole batch (runs on the torch thread).

Order, as in SGLang's sampler: logits → penalties, logit bias and ``min_new_tokens`` masking →
divide by temperature → log-softmax over the full vocabulary (these are the returned
log-probs; greedy rows use the unscaled log-softmax) → top-k / top-p / min-p truncation of the
probabilities → draw. Drawing uses the exponential race (``argmax(p / E)`` with ``E ~ Exp(1)``),
which samples from ``p`` exactly and lets a seeded row draw its noise from its own generator,
so a request with ``sampling_seed`` gets the same tokens whatever else is in the batch.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

GREEDY_EPS = 1e-6
"""Temperatures below this mean greedy decoding (SGLang: ``temperature < 1e-6``)."""


@dataclass(frozen=True, kw_only=True)
class SamplingSpec:
    """Validated sampling parameters of one sequence (the thread-side view)."""

    max_new_tokens: int
    min_new_tokens: int = 0
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    min_p: float = 0.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    repetition_penalty: float = 1.0
    stop: tuple[str, ...] = ()
    stop_token_ids: frozenset[int] = frozenset()
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    no_stop_trim: bool = False
    logit_bias: dict[int, float] = field(default_factory=dict)
    sampling_seed: int | None = None

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_EPS

    @property
    def penalised(self) -> bool:
        return bool(
            self.frequency_penalty or self.presence_penalty or self.repetition_penalty != 1.0
        )


@dataclass(kw_only=True)
class RowSampler:
    """Per-sequence sampling state: its spec, its RNG and (lazily) its token counts."""

    spec: SamplingSpec
    stop_ids: frozenset[int]
    """Token ids that end the sequence (EOS unless ``ignore_eos``, plus ``stop_token_ids``)."""
    generator: torch.Generator | None = None
    output_counts: torch.Tensor | None = None
    """``[V]`` occurrences of each token in the output (frequency / presence penalties)."""
    seen: torch.Tensor | None = None
    """``[V]`` bool: token occurs in prompt or output (repetition penalty)."""

    @classmethod
    def create(
        cls, spec: SamplingSpec, *, eos_ids: frozenset[int], prompt: list[int], vocab: int
    ) -> RowSampler:
        stop_ids = spec.stop_token_ids | (frozenset() if spec.ignore_eos else eos_ids)
        row = cls(spec=spec, stop_ids=stop_ids)
        if spec.sampling_seed is not None:
            row.generator = torch.Generator().manual_seed(spec.sampling_seed)
        if spec.penalised:
            row.output_counts = torch.zeros(vocab)
            row.seen = torch.zeros(vocab, dtype=torch.bool)
            row.seen[torch.tensor(prompt, dtype=torch.long)] = True
        return row

    def observe(self, token: int) -> None:
        """Record an output token (penalty state)."""
        if self.output_counts is not None and self.seen is not None:
            self.output_counts[token] += 1
            self.seen[token] = True


@dataclass(frozen=True)
class Draw:
    """What a step drew: ``tokens [B]``, their log-probs ``[B]`` and full log-probs ``[B, V]``."""

    tokens: torch.Tensor
    token_logprobs: torch.Tensor
    logprobs: torch.Tensor


def _adjust_logits(logits: torch.Tensor, rows: list[RowSampler], lengths: list[int]) -> None:
    """Penalties, logit bias and min_new_tokens masking, in place on ``logits [B, V]``."""
    for i, row in enumerate(rows):
        spec = row.spec
        if row.output_counts is not None and row.seen is not None:
            line = logits[i]
            if spec.repetition_penalty != 1.0:
                scaled = torch.where(
                    line > 0, line / spec.repetition_penalty, line * spec.repetition_penalty
                )
                line.copy_(torch.where(row.seen.to(line.device), scaled, line))
            counts = row.output_counts.to(line.device)
            line -= spec.frequency_penalty * counts
            line -= spec.presence_penalty * (counts > 0).to(line.dtype)
        for token, bias in spec.logit_bias.items():
            logits[i, token] += bias
        if lengths[i] < spec.min_new_tokens and row.stop_ids:
            logits[i, list(row.stop_ids)] = float("-inf")


def _truncate(probs: torch.Tensor, rows: list[RowSampler]) -> torch.Tensor:
    """Zero the probabilities outside each row's top-k / top-p / min-p support."""
    if all(r.spec.top_k < 0 and r.spec.top_p >= 1.0 and r.spec.min_p <= 0.0 for r in rows):
        return probs
    vocab = probs.shape[-1]
    device = probs.device
    top_k = torch.tensor([r.spec.top_k if r.spec.top_k > 0 else vocab for r in rows], device=device)
    top_p = torch.tensor([r.spec.top_p for r in rows], device=device, dtype=probs.dtype)
    min_p = torch.tensor([r.spec.min_p for r in rows], device=device, dtype=probs.dtype)
    sorted_p, order = probs.sort(dim=-1, descending=True)
    ranks = torch.arange(vocab, device=device).expand_as(sorted_p)
    mass_before = sorted_p.cumsum(dim=-1) - sorted_p
    drop = (ranks >= top_k[:, None]) | (mass_before > top_p[:, None])
    drop |= sorted_p < min_p[:, None] * sorted_p[:, :1]
    drop[:, 0] = False
    sorted_p = sorted_p.masked_fill(drop, 0.0)
    return torch.zeros_like(probs).scatter_(-1, order, sorted_p)


def draw(logits: torch.Tensor, rows: list[RowSampler], lengths: list[int]) -> Draw:
    """Pick one token per row from ``logits [B, V]`` (float32); ``lengths`` = tokens so far."""
    logits = logits.float().clone()
    _adjust_logits(logits, rows, lengths)
    temps = torch.tensor(
        [1.0 if r.spec.greedy else r.spec.temperature for r in rows], device=logits.device
    )
    logprobs = torch.log_softmax(logits / temps[:, None], dim=-1)
    probs = _truncate(logprobs.exp(), rows)
    noise = torch.empty_like(probs).exponential_()
    for i, row in enumerate(rows):
        if row.generator is not None:
            own = torch.empty(probs.shape[-1]).exponential_(generator=row.generator)
            noise[i] = own.to(noise.device)
    sampled = (probs / noise).argmax(dim=-1)
    greedy = torch.tensor([r.spec.greedy for r in rows], device=logits.device)
    tokens = torch.where(greedy, logits.argmax(dim=-1), sampled)
    token_logprobs = logprobs.gather(-1, tokens[:, None])[:, 0]
    return Draw(tokens=tokens, token_logprobs=token_logprobs, logprobs=logprobs)
