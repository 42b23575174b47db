"""The trainer: one synchronous ``step(batch) -> metrics`` per training step, on every rank.

```
trainer = Trainer.from_spec(TrainerSpec.from_recipe(cfg, base_dir), groups=groups)
metrics = await anyio.to_thread.run_sync(trainer.step, batch, limiter=torch_limiter)
trainer.save_hf(run_dir / "weights" / f"v{batch.step + 1}")       # publication / export
```

:class:`Trainer` implements :class:`nexrl_async.core.protocols.PolicyTrainer`, the engine's
view of a trainer. Whether a step is RL, SFT or DPO is decided once, when the trainer is built.
An RL step (``algorithm.mode = "rl"``):

1. the batch becomes ``[B, T]`` tensors (:mod:`~nexrl_async.train.tensors`);
2. a no-grad pass with the pre-step weights gives the trainer's log-probs (old log-probs for
   ``recompute``, ``train/logprob_mismatch``, TIS) and entropies, and the reference's
   log-probs when KL is on. The policy's part is skipped when nothing needs it before training
   (one minibatch and epoch, no KL reward, TIS, ``prepare_batch``, dropout): the forward has them;
3. rewards, advantages, KL in the reward, ``prepare_batch`` and TIS weights give the per-token
   targets (:mod:`~nexrl_async.train.targets`);
4. ``minibatches × epochs`` AdamW steps with gradient accumulation and global loss
   denominators (:mod:`~nexrl_async.train.step`; the loss through the ``algorithm.loss`` seam,
   :mod:`~nexrl_async.train.loss`);
5. the LR schedule and the adaptive KL controller advance once.

An SFT step trains the loss-masked tokens' NLL (steps 1, 4, 5); DPO: :mod:`~nexrl_async.train.dpo`.

At world size ``N > 1`` (``groups``, see :mod:`~nexrl_async.train.ranks.topology`) every rank builds
the same trainer, sharded with FSDP2 (:mod:`~nexrl_async.train.ranks.sharding`; the reference too
unless it lives on CPU), and calls the same methods in the same order (rank 0's
``DistributedTrainer`` and the followers' loop see to that). Each rank computes the pre-step
log-probs of its share of the rows (assembled on every rank), builds the targets of the whole
batch, and trains its share of each minibatch with global denominators: the update is world
size 1's, and the metrics are the same on every rank (except ``train/step_s``).
``prepare_batch`` runs on every rank with the same inputs, so it must be deterministic.

Everything here is blocking torch code; the engine calls it from a worker thread, never on the
event loop. A trainer is not thread-safe: call one method at a time (``step``, ``save_hf``,
``named_parameters_for_sync``, checkpoints), e.g. all through one ``CapacityLimiter(1)``. The
reference model (and a LoRA policy's frozen base) is a copy of the initial weights that no
checkpoint stores: a resumed run rebuilds it from the recipe, then loads the checkpoint.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path

import torch
from loguru import logger
from torch import Tensor
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler
from transformers import PreTrainedModel
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from nexrl_async.algorithms.kl import kl_controller
from nexrl_async.config.training import AlgorithmConfig, OptimConfig, TrainerConfig
from nexrl_async.core.errors import TrainError
from nexrl_async.core.records import TrainBatch
from nexrl_async.train.checkpoint import load_trainer, save_trainer
from nexrl_async.train.custom_loss import loss_seams
from nexrl_async.train.dpo import DPOStep
from nexrl_async.train.evaluation import validation_loss
from nexrl_async.train.export import parameters_for_sync, save_hf_folder
from nexrl_async.train.hook import PrepareBatchHook
from nexrl_async.train.logprobs import model_device
from nexrl_async.train.lora import footprint
from nexrl_async.train.loss import ForwardCapture, RLLoss, SFTLoss
from nexrl_async.train.model_loading import DTYPES, frozen_copy, load_policy, set_torch_threads
from nexrl_async.train.ranks.lockstep import rank_logprobs, rank_rows
from nexrl_async.train.ranks.sharding import (
    enable_activation_checkpointing,
    full_state_dict,
    gathered_parameters,
    shard_model,
)
from nexrl_async.train.ranks.topology import ProcessGroups, Topology, training_device
from nexrl_async.train.schedule import build_optimizer, build_scheduler
from nexrl_async.train.spec import TrainerSpec
from nexrl_async.train.step import UpdateSettings, run_updates
from nexrl_async.train.targets import (
    PrePass,
    build_targets,
    has_dropout,
    pre_pass_optional,
    prepass_metrics,
)
from nexrl_async.train.tensors import SequenceBatch, sequences_from_batch

StepMetrics = dict[str, float]
"""Slash-namespaced metrics of one step (``train/loss``, ``train/grad_norm``, ...)."""

GREEDY_TEMPERATURE = 1e-6
"""Below this the server samples greedily and reports plain log-softmax log-probs."""


class Trainer:
    """Policy, optimizer, schedule, reference model and KL controller of one run.

    Args:
        model: the policy (on its training device; see :func:`load_policy`).
        tokenizer: its tokenizer (saved with every HF export).
        algorithm: ``[algorithm]``.
        optim: ``[optim]``.
        trainer: ``[trainer]``.
        max_new_tokens: ``rollout.max_new_tokens``: the overlong penalty's limit and the
            constant normaliser of ``loss_agg = "seq-mean-token-sum-norm"``.
        total_steps: ``run.total_steps``; needed by the linear and cosine schedules.
        temperature: ``rollout.sampling.temperature``; log-probs use ``logits / temperature``
            like the server's (greedy, below 1e-6, means 1).
        base_dir: folder that ``algorithm.prepare_batch`` is relative to (the recipe's).
        groups: the ranks' process groups; ``None`` (or world size 1) trains unsharded.
        export_dtype: dtype of floating tensors in sharded exports and weight sync (the
            recipe's model dtype when the shards are float32 master weights); ``None`` keeps
            the parameters' dtype.
    """

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        *,
        algorithm: AlgorithmConfig,
        optim: OptimConfig,
        trainer: TrainerConfig,
        max_new_tokens: int,
        total_steps: int | None = None,
        temperature: float = 1.0,
        base_dir: Path | None = None,
        groups: ProcessGroups | None = None,
        export_dtype: torch.dtype | None = None,
    ) -> None:
        self.groups = groups or ProcessGroups(topology=Topology(), device=model_device(model))
        self.export_dtype = export_dtype
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.algorithm = algorithm
        self.config = trainer
        self.max_new_tokens = max_new_tokens
        self.temperature = temperature if temperature >= GREEDY_TEMPERATURE else 1.0
        self.pad_token_id = _pad_token_id(tokenizer)
        self.steps_done = 0
        if trainer.activation_checkpointing:
            enable_activation_checkpointing(model)
        mode, rl = algorithm.mode, algorithm.mode == "rl"  # the one place the modes part ways
        self._train: Callable[[SequenceBatch, TrainBatch], StepMetrics] = {
            "rl": self._rl_step, "sft": self._sft_step, "dpo": self._dpo_step
        }[mode]  # fmt: skip
        if not rl and (algorithm.kl.placement != "none" or algorithm.prepare_batch is not None):
            logger.warning("algorithm.mode = {!r}: kl and prepare_batch are ignored", mode)
        uses_kl = rl and algorithm.kl.placement != "none"
        needs_ref = uses_kl or (mode == "dpo" and algorithm.dpo.reference == "model")
        on_cpu = algorithm.reference_on_cpu
        self.reference = frozen_copy(model, on_cpu=on_cpu) if needs_ref else None
        self._objective, pair_objective = loss_seams(mode, algorithm.loss, base_dir or Path.cwd())
        if self.groups.distributed:
            self._shard(trainer.param_dtype, reference_on_cpu=algorithm.reference_on_cpu)
        self.kl_controller = kl_controller(algorithm.kl) if uses_kl else None
        self.optimizer: Optimizer = build_optimizer(model.parameters(), optim)
        self.scheduler: LRScheduler = build_scheduler(self.optimizer, optim, total_steps)
        self._hook = None
        if rl and algorithm.prepare_batch is not None:
            self._hook = PrepareBatchHook.load(algorithm.prepare_batch, base_dir or Path.cwd())
        self._skip_policy_pre_pass = pre_pass_optional(algorithm) and not has_dropout(model)
        self._settings = UpdateSettings(
            epochs=algorithm.epochs,
            minibatches=algorithm.minibatches,
            token_budget=trainer.micro_batch_tokens,
            max_grad_norm=optim.max_grad_norm,
            packing=trainer.packing,
            share_prefix=trainer.share_prefix,
            rank=self.groups.rank,
            world_size=self.groups.world_size,
        )
        self._dpo = DPOStep(
            model=model, reference=self.reference, optimizer=self.optimizer, config=algorithm.dpo,
            settings=self._settings, objective=pair_objective, pad_token_id=self.pad_token_id,
        )  # fmt: skip

    def _shard(self, param_dtype: str, *, reference_on_cpu: bool) -> None:
        shard_model(self.model, self.groups, param_dtype=param_dtype)
        if self.reference is not None and not reference_on_cpu:
            shard_model(self.reference, self.groups, param_dtype=param_dtype, trainable=False)

    @classmethod
    def from_spec(cls, spec: TrainerSpec, *, groups: ProcessGroups | None = None) -> Trainer:
        """Set torch's threads, load the policy onto ``spec.trainer.device`` and build the trainer.

        With ``groups`` (world size > 1) every rank loads the policy onto its own device
        (``groups.device``), float32 when FSDP2 computes in bf16 (the shards are the float32
        master weights; exports are cast back to ``spec.model.dtype``).
        """
        cfg = spec.trainer
        set_torch_threads(cfg.threads)
        if groups is None:
            device = training_device(Topology(), cfg.device)
            groups = ProcessGroups(topology=Topology(), device=device)
        mixed = groups.distributed and groups.device.type == "cuda"
        mixed = mixed and cfg.param_dtype == "bfloat16"
        model, tokenizer = load_policy(
            spec.model,
            spec.tokenizer,
            seed=spec.seed,
            device=groups.device,
            dtype=torch.float32 if mixed else None,
        )
        return cls(
            model,
            tokenizer,
            algorithm=spec.algorithm,
            optim=spec.optim,
            trainer=cfg,
            max_new_tokens=spec.max_new_tokens,
            total_steps=spec.total_steps,
            temperature=spec.temperature,
            base_dir=spec.base_dir,
            groups=groups,
            export_dtype=DTYPES[spec.model.dtype] if mixed else None,
        )

    @property
    def device(self) -> torch.device:
        """The policy's device."""
        return model_device(self.model)

    @property
    def context_length(self) -> int | None:
        """The policy's ``max_position_embeddings`` (``None`` when its config has none)."""
        value = getattr(self.model.config, "max_position_embeddings", None)
        return int(value) if value else None

    def step(self, batch: TrainBatch) -> StepMetrics:
        """Train on ``batch`` (blocking); returns its metrics.

        Raises:
            TrainError: a FAILED or empty trajectory, a missing server log-prob the config
                needs, a bad ``prepare_batch`` result, or a torch failure (the weights may then
                be partly updated: treat it as fatal or restore a checkpoint).
            UserCodeError: ``prepare_batch`` raised.
        """
        started = time.perf_counter()
        lr = float(self.optimizer.param_groups[0]["lr"])
        try:
            seq = sequences_from_batch(batch, pad_token_id=self.pad_token_id)
            metrics = self._train(seq, batch)
        except (RuntimeError, ValueError) as err:
            raise TrainError(f"step {batch.step}: {type(err).__name__}: {err}") from err
        self.scheduler.step()
        self.steps_done += 1
        metrics |= footprint(self.model, self.optimizer) | {"train/lr": lr}  # params, optim MiB
        metrics["train/step_s"] = time.perf_counter() - started
        return metrics

    def _rl_step(self, seq: SequenceBatch, batch: TrainBatch) -> StepMetrics:
        skip, step = self._skip_policy_pre_pass, batch.step
        prepass = self._pre_pass(seq, policy=not skip)
        coef = self.kl_controller.coef if self.kl_controller is not None else 0.0
        targets, metrics = build_targets(
            seq, prepass, self.algorithm, step=step, kl_coef=coef,
            max_new_tokens=self.max_new_tokens, hook=self._hook,
        )  # fmt: skip
        loss = RLLoss(
            algo=self.algorithm, targets=targets, temperature=self.temperature, kl_coef=coef,
            norm_constant=float(self.max_new_tokens), objective=self._objective,
            capture=self._capture(seq) if skip else None,
        )  # fmt: skip
        metrics.update(run_updates(self.model, self.optimizer, seq, loss, self._settings))
        if loss.capture is not None:
            logprobs, entropy = loss.capture.gathered()
            captured = replace(prepass, trainer_logprobs=logprobs, entropy=entropy)
            metrics.update(prepass_metrics(seq, captured, targets.loss_mask, self.algorithm))
        if self.kl_controller is not None:
            metrics["train/kl_coef"] = coef
            horizon = getattr(self.kl_controller, "horizon", math.inf)
            self.kl_controller.update(metrics["train/kl"], int(min(seq.size, horizon)))
        return metrics

    def _sft_step(self, seq: SequenceBatch, batch: TrainBatch) -> StepMetrics:
        loss = SFTLoss(
            loss_mask=seq.loss_mask, agg=self.algorithm.loss_agg, algo=self.algorithm,
            norm_constant=float(self.max_new_tokens), objective=self._objective,
        )  # fmt: skip
        metrics = run_updates(self.model, self.optimizer, seq, loss, self._settings)
        metrics["train/tokens"] = float(seq.lengths.sum())
        metrics["train/loss_tokens"] = float((seq.loss_mask != 0).sum())
        return metrics

    def _dpo_step(self, seq: SequenceBatch, batch: TrainBatch) -> StepMetrics:
        return self._dpo.step(seq, batch)  # train/dpo.py

    def _pre_pass(self, seq: SequenceBatch, *, policy: bool = True) -> PrePass:
        """No-grad log-probs before the step: the policy's (unless ``policy=False``, when the
        training forward provides them) and the reference's."""
        logprobs, entropy = None, None
        if policy:
            logprobs, entropy = self._logprobs(self.model, seq, with_entropy=True)
        ref = None
        if self.reference is not None:
            ref, _ = self._logprobs(self.reference, seq, with_entropy=False)
        return PrePass(trainer_logprobs=logprobs, entropy=entropy, ref_logprobs=ref)

    def _capture(self, seq: SequenceBatch) -> ForwardCapture:
        groups = self.groups
        rows = rank_rows(seq.lengths, range(seq.size), groups.rank, groups.world_size)
        return ForwardCapture.for_rows(seq.input_ids.shape, rows)

    def _logprobs(
        self, model: PreTrainedModel, seq: SequenceBatch, *, with_entropy: bool
    ) -> tuple[Tensor, Tensor | None]:
        """``[B, T]`` no-grad log-probs (entropies) of every row, on every rank."""
        return rank_logprobs(
            model,
            seq,
            rank=self.groups.rank,
            world_size=self.groups.world_size,
            token_budget=self.config.micro_batch_tokens,
            temperature=self.temperature,
            packing=self.config.packing,
            with_entropy=with_entropy,
            share_prefix=self.config.share_prefix,
        )

    def compute_logprobs(self, batch: TrainBatch) -> list[list[float]]:
        """The policy's log-prob of every token of every trajectory (batch order), at the
        trainer's temperature; a trajectory's first token has none (0.0). Every rank gets them.

        Raises:
            TrainError: a bad batch (as :meth:`step`) or a torch failure.
        """
        try:
            seq = sequences_from_batch(batch, pad_token_id=self.pad_token_id)
            logprobs, _ = self._logprobs(self.model, seq, with_entropy=False)
        except (RuntimeError, ValueError) as err:
            raise TrainError(f"log-probs of step {batch.step}: {err}") from err
        return [row[:n].tolist() for row, n in zip(logprobs, seq.lengths.tolist(), strict=True)]

    # ---- export and state -------------------------------------------------------------------

    def save_hf(self, path: str | Path) -> Path:
        """Write the policy and tokenizer as an HF safetensors folder, atomically.

        Sharded: every rank calls it (the weights are gathered), rank 0 writes the folder.
        """
        if not self.groups.distributed:
            return save_hf_folder(self.model, self.tokenizer, path)
        state = full_state_dict(self.model, self.export_dtype)
        if self.groups.topology.is_main:
            return save_hf_folder(self.model, self.tokenizer, path, state_dict=state)
        return Path(path)

    def named_parameters_for_sync(self) -> Iterator[tuple[str, Tensor]]:
        """``(HF name, detached tensor)`` per parameter, streamed (for weight transports).

        Sharded: full tensors (on the training device), one all-gather per parameter; every rank
        must iterate to the end in step (followers just drain it).
        """
        if not self.groups.distributed:
            return parameters_for_sync(self.model)
        return parameters_for_sync(self.model, gathered_parameters(self.model, self.export_dtype))

    def validation_loss(self, batch: TrainBatch) -> StepMetrics:
        """``val/*`` NLL metrics of ``batch`` (see :mod:`nexrl_async.train.evaluation`); DPO:
        held-out preference accuracy (:meth:`DPOStep.validate`).

        Sharded: every rank calls it with the same batch.
        """
        if self.algorithm.mode == "dpo":
            return self._dpo.validate(batch)
        return validation_loss(
            self.model,
            batch,
            pad_token_id=self.pad_token_id,
            token_budget=self.config.micro_batch_tokens,
        )

    def save_checkpoint(self, directory: str | Path) -> Path:
        """Model, optimizer, schedule, KL controller and ``steps_done`` into ``directory`` with
        DCP (:func:`~nexrl_async.train.checkpoint.save_trainer`; sharded: every rank calls it)."""
        return save_trainer(self, directory)

    def load_checkpoint(self, directory: str | Path) -> None:
        """Restore what :meth:`save_checkpoint` wrote, into a trainer built from the same spec.

        Raises:
            CheckpointError: no trainer state in ``directory``, or it does not fit.
        """
        load_trainer(self, directory)

    def shutdown(self) -> None:
        """Nothing to release at world size 1 (rank 0's handle releases the followers)."""


def _pad_token_id(tokenizer: PreTrainedTokenizerBase) -> int:
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if isinstance(candidate, int):
            return candidate
    return 0
