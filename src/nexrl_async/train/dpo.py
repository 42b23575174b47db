"""DPO training steps and validation (``algorithm.mode = "dpo"``; docs/algorithms.md, *DPO*).

A batch holds preference pairs: each group is one prompt with two trajectories, sample 0 the
*chosen* completion and sample 1 the *rejected* one (what
:class:`~nexrl_async.rollout.preference_worker.PreferenceWorker` builds). The pair loss depends on
each completion's sequence log-prob ``s_b = sum_t m_bt · log p_bt`` only, and a pair's two rows
may land in different micro-batches or on different ranks, so one step runs in two passes:

1. no-grad log-probs of every row under the policy (and the reference model, unless the data
   carries the reference's log-probs), each rank computing its share (assembled on every rank);
2. the pair loss ``L(s)`` through the ``algorithm.loss`` seam on the ``[P]`` sequence log-probs,
   and its gradient ``w_b = dL/ds_b`` by autograd over those ``P`` numbers;
3. one optimizer step on the surrogate ``sum_b w_b · s_b(theta)``, micro-batch by micro-batch
   (:func:`~nexrl_async.train.step.run_updates`), whose gradient is exactly ``dL/dtheta``.

So the update does not depend on how rows are grouped into micro-batches or ranks, and world
size 1 and N take the same step. ``train/loss`` is ``L`` of pass 2 (``ln 2`` at step 0, when the
policy is the reference and the loss is ``sigmoid``). Log-probs are at temperature 1; the first
pass runs in eval mode, so with dropout the weights ``w`` come from the dropout-free forward.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace

import msgspec
import torch
from torch import Tensor
from torch.optim import Optimizer
from transformers import PreTrainedModel

from nexrl_async.algorithms.preference import PairLossInputs, implicit_rewards, preference_stats
from nexrl_async.algorithms.token_loss import MetricValue
from nexrl_async.config.training import DPOConfig, LossAgg
from nexrl_async.core.errors import TrainError
from nexrl_async.core.records import Group, TrainBatch
from nexrl_async.train.custom_loss import LossSeam
from nexrl_async.train.logprobs import forward_logprobs
from nexrl_async.train.loss import MicroResult
from nexrl_async.train.microbatch import MicroBatch
from nexrl_async.train.ranks.lockstep import rank_logprobs
from nexrl_async.train.step import UpdateSettings, run_updates
from nexrl_async.train.tensors import SequenceBatch, sequences_from_batch

REF_LOGPROB_METRIC = "ref_logprob"
"""The trajectory metric holding the reference's sequence log-prob (``dpo.reference = "data"``)."""

DPO_TEMPERATURE = 1.0


@dataclass(frozen=True)
class Pairs:
    """Rows of the chosen and rejected completions, ``[P]`` int64 each, and (``reference =
    "data"``) their reference sequence log-probs, ``[P]`` float64."""

    chosen: Tensor
    rejected: Tensor
    ref_chosen: Tensor | None
    ref_rejected: Tensor | None


def preference_pairs(batch: TrainBatch) -> Pairs:
    """The pairs of ``batch`` (rows in ``batch.trajectories`` order).

    Raises:
        TrainError: a group that is not one chosen (sample 0) and one rejected (sample 1)
            trajectory.
    """
    chosen: list[int] = []
    rejected: list[int] = []
    refs: list[list[float | None]] = [[], []]
    row = 0
    for group in batch.groups:
        indices = sorted(t.sample_index for t in group.trajectories)
        if indices != [0, 1]:
            raise TrainError(
                f"step {batch.step}: group {group.group_id} holds samples {indices}, not a "
                'preference pair; algorithm.mode = "dpo" trains groups of a chosen (sample 0) and '
                "a rejected (sample 1) completion, e.g. from "
                "nexrl_async.rollout.preference_worker:PreferenceWorker"
            )
        for traj in group.trajectories:
            (chosen if traj.sample_index == 0 else rejected).append(row)
            refs[traj.sample_index].append(traj.metrics.get(REF_LOGPROB_METRIC))
            row += 1
    ref_c, ref_r = (_known(values) for values in refs)
    return Pairs(
        chosen=torch.tensor(chosen, dtype=torch.int64),
        rejected=torch.tensor(rejected, dtype=torch.int64),
        ref_chosen=ref_c,
        ref_rejected=ref_r,
    )


def _known(values: list[float | None]) -> Tensor | None:
    if any(v is None for v in values):
        return None
    return torch.tensor(values, dtype=torch.float64)


def sequence_logprobs(logprobs: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """``(s, n)``: per-row sums of the masked log-probs and the masked token counts, ``[B]``
    float64, from ``[B, T]`` log-probs and mask."""
    keep = mask != 0
    total = torch.where(keep, logprobs.double(), 0.0).sum(dim=-1)
    return total, keep.sum(dim=-1).double()


@dataclass
class PairSurrogate:
    """The micro-batch loss ``sum_b w_b · sum_t m_bt · log p_bt`` (its gradient is the pair
    loss's; its value means nothing)."""

    loss_mask: Tensor
    weights: Tensor
    """``[B]``: ``dL/ds_b``."""
    agg: LossAgg = "seq-mean-token-sum"
    """Unused: the surrogate needs no denominator (required by the ``MicroLoss`` protocol)."""

    def __call__(self, model: PreTrainedModel, mb: MicroBatch, denominator: Tensor) -> MicroResult:
        logprobs, _ = forward_logprobs(model, mb, temperature=DPO_TEMPERATURE, with_entropy=False)
        mask = mb.take(self.loss_mask)
        weights = self.weights[mb.rows].to(logprobs.device, logprobs.dtype)
        loss = (torch.where(mask != 0, logprobs, 0.0) * weights[:, None]).sum()
        return MicroResult(loss=loss, tokens=float((mask != 0).sum()))


@dataclass
class DPOStep:
    """The DPO steps and validation of one trainer (see the module docstring).

    ``reference`` is the frozen reference model, or ``None`` when the data carries the
    reference's log-probs (``dpo.reference = "data"``).
    """

    model: PreTrainedModel
    reference: PreTrainedModel | None
    optimizer: Optimizer
    settings: UpdateSettings
    config: DPOConfig
    objective: LossSeam[PairLossInputs]
    pad_token_id: int

    def step(self, seq: SequenceBatch, batch: TrainBatch) -> dict[str, float]:
        """One optimizer step on ``batch``'s pairs; ``train/*`` metrics."""
        pairs = preference_pairs(batch)
        inputs = self._inputs(seq, pairs, batch.step)
        inputs = _with_grad(inputs)
        out = self.objective(inputs)
        if not out.loss.requires_grad:
            raise TrainError(
                f"algorithm.loss {self.objective.name}: the loss does not depend on the "
                "policy's log-probs (chosen_logps, rejected_logps)"
            )
        grads = torch.autograd.grad(
            out.loss, [inputs.chosen_logps, inputs.rejected_logps], allow_unused=True
        )
        weights = torch.zeros(seq.size, dtype=torch.float64)
        for rows, grad in zip((pairs.chosen, pairs.rejected), grads, strict=True):
            if grad is not None:
                weights[rows] = grad.detach()
        surrogate = PairSurrogate(loss_mask=seq.loss_mask, weights=weights.float())
        metrics = run_updates(self.model, self.optimizer, seq, surrogate, self.settings)
        metrics.update(self._metrics("train", inputs, out.loss, out.metrics))
        metrics["train/tokens"] = float(seq.lengths.sum())
        metrics["train/loss_tokens"] = float((seq.loss_mask != 0).sum())
        return metrics

    def validate(self, batch: TrainBatch) -> dict[str, float]:
        """``val/*`` of held-out pairs: the pair loss, preference accuracy and reward margin.

        Pairs with a FAILED side are left out (the validator counts them in ``val/failed``).
        """
        kept = [g for g in batch.groups if _complete_pair(g)]
        if not kept:
            nan = float("nan")
            return {"val/loss": nan, "val/preference_accuracy": nan, "val/pairs": 0.0}
        batch = msgspec.structs.replace(batch, groups=kept)
        try:
            seq = sequences_from_batch(batch, pad_token_id=self.pad_token_id)
            inputs = self._inputs(seq, preference_pairs(batch), batch.step)
            with torch.no_grad():
                out = self.objective(inputs)
        except (RuntimeError, ValueError, IndexError) as err:
            raise TrainError(f"DPO validation: {type(err).__name__}: {err}") from err
        return self._metrics("val", inputs, out.loss, out.metrics)

    def _inputs(self, seq: SequenceBatch, pairs: Pairs, step: int) -> PairLossInputs:
        policy, tokens = sequence_logprobs(self._logprobs(self.model, seq), seq.loss_mask)
        if self.reference is not None:
            ref, _ = sequence_logprobs(self._logprobs(self.reference, seq), seq.loss_mask)
            ref_c, ref_r = ref[pairs.chosen], ref[pairs.rejected]
        elif pairs.ref_chosen is not None and pairs.ref_rejected is not None:
            ref_c, ref_r = pairs.ref_chosen, pairs.ref_rejected
        else:
            raise TrainError(
                f'step {step}: algorithm.dpo.reference = "data" needs every pair\'s reference '
                "log-probs (the items' ref_chosen_logprob and ref_rejected_logprob fields; list "
                "them in data.required)"
            )
        return PairLossInputs(
            chosen_logps=policy[pairs.chosen],
            rejected_logps=policy[pairs.rejected],
            ref_chosen_logps=ref_c,
            ref_rejected_logps=ref_r,
            chosen_tokens=tokens[pairs.chosen],
            rejected_tokens=tokens[pairs.rejected],
            config=self.config,
        )

    def _logprobs(self, model: PreTrainedModel, seq: SequenceBatch) -> Tensor:
        settings = self.settings
        logprobs, _ = rank_logprobs(
            model,
            seq,
            rank=settings.rank,
            world_size=settings.world_size,
            token_budget=settings.token_budget,
            temperature=DPO_TEMPERATURE,
            packing=settings.packing,
        )
        return logprobs

    def _metrics(
        self, area: str, inputs: PairLossInputs, loss: Tensor, extra: Mapping[str, MetricValue]
    ) -> dict[str, float]:
        chosen, rejected = implicit_rewards(inputs)
        values = {k: float(v) for k, v in preference_stats(chosen, rejected).items()}
        values.update(self.objective.metric_floats(extra))
        out = {f"{area}/{k}": v for k, v in values.items()}
        out[f"{area}/loss"] = float(loss.detach())
        out[f"{area}/pairs"] = float(inputs.chosen_logps.numel())
        out[f"{area}/logp_chosen"] = float(inputs.chosen_logps.detach().mean())
        out[f"{area}/logp_rejected"] = float(inputs.rejected_logps.detach().mean())
        return out


def _with_grad(inputs: PairLossInputs) -> PairLossInputs:
    """``inputs`` with the policy's sequence log-probs as fresh leaves that require grad."""
    return replace(
        inputs,
        chosen_logps=inputs.chosen_logps.detach().requires_grad_(),
        rejected_logps=inputs.rejected_logps.detach().requires_grad_(),
    )


def _complete_pair(group: Group) -> bool:
    return len(group.trajectories) == 2 and all(
        t.ok and t.num_tokens > 0 for t in group.trajectories
    )
