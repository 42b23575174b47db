"""The loss of one micro-batch, normalised by its minibatch's global denominator.

Every term is ``aggregate(per_token, mask, loss_agg, denominator=D)`` with the same ``D`` (the
token or sequence count of the whole minibatch, summed over micro-batches and ranks), so summing
micro-batch losses — as gradient accumulation does — gives exactly the full-minibatch loss.

RL (per token, ``l_pg`` from :func:`policy_loss`, ``kl`` the estimator against the reference,
``H`` the entropy)::

    loss = agg(l_pg) + beta · agg(kl)  [kl.placement = "loss"]  - entropy_coef · agg(H)

SFT: ``loss = agg(-log p)`` over the loss-masked tokens.

Both go through the ``algorithm.loss`` seam (:mod:`~nexrl_async.train.custom_loss`): the terms
above are the built-in functions, and a recipe's own function receives the same per-token
tensors (:class:`~nexrl_async.algorithms.token_loss.TokenLossInputs`) in their place.

Without old log-probs in the targets (the trainer skipped its pre-pass) the RL loss takes its
forward's own log-probs, detached, as the old ones (ratio 1, the same gradient), and records
that forward's log-probs and entropies (no-grad) in a :class:`ForwardCapture` for the metrics.

``seq-mean-token-sum-norm`` divides by a constant (Dr. GRPO), the trainer's ``norm_constant``
(``rollout.max_new_tokens``), never by a micro-batch's padded width.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import torch
from torch import Tensor
from transformers import PreTrainedModel

from nexrl_async.algorithms.token_loss import TokenLossInputs, nll_token_loss, ppo_token_loss
from nexrl_async.config.training import AlgorithmConfig, LossAgg
from nexrl_async.train.custom_loss import LossSeam
from nexrl_async.train.logprobs import forward_logprobs
from nexrl_async.train.microbatch import MicroBatch
from nexrl_async.train.ranks.collectives import all_reduce_sum
from nexrl_async.train.targets import UpdateTargets


@dataclass
class MicroResult:
    """One micro-batch's differentiable loss and its detached statistics."""

    loss: Tensor
    """0-dim loss, already divided by the minibatch's global denominator."""
    sums: dict[str, float] = field(default_factory=dict)
    """Loss parts that add up over the micro-batches of a minibatch."""
    means: dict[str, float] = field(default_factory=dict)
    """Token means over this micro-batch's loss tokens (weighted by ``tokens`` when merged)."""
    tokens: float = 0.0
    """Loss tokens in this micro-batch."""


class MicroLoss(Protocol):
    """A loss over micro-batches: its mask (for the denominator) and the loss of one of them."""

    @property
    def loss_mask(self) -> Tensor:
        """``[B, T]`` 0/1 mask of the loss tokens."""
        ...

    @property
    def agg(self) -> LossAgg:
        """Aggregation mode (decides whether ``D`` counts tokens or sequences)."""
        ...

    def __call__(self, model: PreTrainedModel, mb: MicroBatch, denominator: Tensor) -> MicroResult:
        """The micro-batch's loss with ``D = denominator``."""
        ...


@dataclass
class ForwardCapture:
    """Detached log-probs and entropies of the loss forwards, ``[B, T]`` float32 on CPU.

    Only micro-batches of this rank's ``owned`` rows are recorded (a lockstep filler of another
    rank's row is not), so a sum over ranks assembles the whole batch (:meth:`gathered`).
    """

    logprobs: Tensor
    entropy: Tensor
    owned: Tensor
    """``[B]`` bool: the rows this rank trains."""

    @classmethod
    def for_rows(cls, shape: torch.Size, rows: list[int]) -> ForwardCapture:
        """An empty capture of a ``shape`` = ``[B, T]`` batch whose ``rows`` this rank owns."""
        owned = torch.zeros(shape[0], dtype=torch.bool)
        owned[torch.tensor(rows, dtype=torch.int64)] = True
        logprobs = torch.zeros(shape, dtype=torch.float32)
        return cls(logprobs=logprobs, entropy=torch.zeros_like(logprobs), owned=owned)

    def record(self, mb: MicroBatch, logprobs: Tensor, entropy: Tensor | None) -> None:
        """Store one micro-batch's results (skipped unless this rank owns all its rows)."""
        if len(mb.rows) == 0 or not bool(self.owned[mb.rows].all()):
            return
        with torch.no_grad():
            self.logprobs[mb.rows, : mb.width] = logprobs.detach().float().cpu()
            if entropy is not None:
                self.entropy[mb.rows, : mb.width] = entropy.detach().float().cpu()

    def gathered(self) -> tuple[Tensor, Tensor]:
        """Log-probs and entropies of every row, summed over ranks (identity at world size 1)."""
        return all_reduce_sum(self.logprobs), all_reduce_sum(self.entropy)


@dataclass
class RLLoss:
    """The RL loss through the ``algorithm.loss`` seam (built-in: PPO-clip policy loss plus
    optional KL-to-reference and entropy terms, :func:`ppo_token_loss`)."""

    algo: AlgorithmConfig
    targets: UpdateTargets
    temperature: float
    kl_coef: float
    norm_constant: float
    capture: ForwardCapture | None = None
    """Record the forwards' log-probs and entropies (the trainer's skipped pre-pass)."""
    objective: LossSeam[TokenLossInputs] = field(
        default_factory=lambda: LossSeam(ppo_token_loss, name="built-in rl loss")
    )

    @property
    def loss_mask(self) -> Tensor:
        return self.targets.loss_mask

    @property
    def agg(self) -> LossAgg:
        return self.algo.loss_agg

    def __call__(self, model: PreTrainedModel, mb: MicroBatch, denominator: Tensor) -> MicroResult:
        logprobs, entropy = self._forward(model, mb)
        targets = self.targets
        old = targets.old_logprobs
        inputs = TokenLossInputs(
            logprobs=logprobs,
            loss_mask=mb.take(targets.loss_mask),
            denominator=denominator,
            agg=self.algo.loss_agg,
            norm_constant=self.norm_constant,
            algorithm=self.algo,
            old_logprobs=logprobs.detach() if old is None else mb.take(old),
            advantages=mb.take(targets.advantages),
            ref_logprobs=None if targets.ref_logprobs is None else mb.take(targets.ref_logprobs),
            entropy=entropy if self.algo.entropy_coef > 0 else None,
            kl_coef=self.kl_coef,
        )
        return micro_result(self.objective, inputs)

    def _forward(self, model: PreTrainedModel, mb: MicroBatch) -> tuple[Tensor, Tensor | None]:
        """Log-probs and, for the entropy bonus or the capture, entropies of ``mb``."""
        bonus = self.algo.entropy_coef > 0
        logprobs, entropy = forward_logprobs(
            model,
            mb,
            temperature=self.temperature,
            with_entropy=bonus or self.capture is not None,
            entropy_grad=bonus,
        )
        if self.capture is not None:
            self.capture.record(mb, logprobs, entropy)
        return logprobs, entropy


@dataclass
class SFTLoss:
    """The SFT loss through the ``algorithm.loss`` seam (built-in: the negative log-likelihood
    of the loss-masked tokens at temperature 1, :func:`nll_token_loss`)."""

    loss_mask: Tensor
    agg: LossAgg
    norm_constant: float
    algo: AlgorithmConfig = field(default_factory=lambda: AlgorithmConfig(mode="sft"))
    objective: LossSeam[TokenLossInputs] = field(
        default_factory=lambda: LossSeam(nll_token_loss, name="built-in sft loss")
    )

    def __call__(self, model: PreTrainedModel, mb: MicroBatch, denominator: Tensor) -> MicroResult:
        logprobs, _ = forward_logprobs(model, mb, temperature=1.0, with_entropy=False)
        inputs = TokenLossInputs(
            logprobs=logprobs,
            loss_mask=mb.take(self.loss_mask),
            denominator=denominator,
            agg=self.agg,
            norm_constant=self.norm_constant,
            algorithm=self.algo,
        )
        return micro_result(self.objective, inputs)


def micro_result(objective: LossSeam[TokenLossInputs], inputs: TokenLossInputs) -> MicroResult:
    """Call the seam and file its output: ``parts`` add up, ``metrics`` are token means."""
    out = objective(inputs)
    return MicroResult(
        loss=out.loss,
        sums=objective.metric_floats(out.parts),
        means=objective.metric_floats(out.metrics),
        tokens=float((inputs.loss_mask != 0).sum()),
    )
