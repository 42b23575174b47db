"""Recipe sections ``[algorithm]``, ``[optim]``, ``[trainer]`` and ``[checkpoint]``."""

from __future__ import annotations

from typing import Annotated, Literal

import msgspec
from msgspec import Meta, Struct

from nexrl_async.config.types import NonNegFloat, NonNegInt, PosFloat, PosInt, Probability, RefStr

Estimator = Literal["grpo", "dr_grpo", "rloo", "reinforce_pp"]
LossAgg = Literal[
    "token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm"
]


class KLConfig(Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """KL to the reference model: in the reward, as a loss term, or off."""

    placement: Literal["none", "reward", "loss"] = "none"
    """Where the KL penalty acts."""
    kind: Literal["k1", "abs", "k2", "k3"] = "k3"
    """Estimator of the per-token KL."""
    coef: NonNegFloat = 0.001
    """Initial (or fixed) coefficient."""
    controller: Literal["fixed", "adaptive"] = "fixed"
    """Keep ``coef`` fixed, or adapt it towards ``target`` (PPO rule)."""
    target: PosFloat = 0.1
    """Target KL of the adaptive controller."""
    horizon: PosInt = 10000
    """Horizon of the adaptive controller."""


class TISConfig(Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Importance correction for the trainer/inference log-prob mismatch."""

    enabled: bool = False
    """Weight the loss by exp(trainer_old − rollout) log-prob ratios."""
    cap: PosFloat = 2.0
    """Ratios above the cap are truncated (or masked)."""
    level: Literal["token", "sequence"] = "token"
    """Per-token ratios or one per sequence."""
    mode: Literal["truncate", "mask"] = "truncate"
    """Truncate to the cap, or zero the weight."""


class OverlongConfig(Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """DAPO's soft penalty for responses near the length limit."""

    enabled: bool = False
    """Add the penalty to the reward."""
    buffer_len: PosInt = 32
    """Penalty ramps over the last ``buffer_len`` tokens before max_new_tokens."""
    factor: NonNegFloat = 1.0
    """Penalty at the limit."""


class DPOConfig(Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Direct Preference Optimization (``algorithm.mode = "dpo"``; docs/algorithms.md, *DPO*)."""

    beta: PosFloat = 0.1
    """How far the policy may move from the reference: the sigmoid's scale (IPO: its tau)."""
    loss: Literal["sigmoid", "ipo"] = "sigmoid"
    """``sigmoid``: DPO's ``-log σ(beta · h)``; ``ipo``: ``(h - 1/(2 · beta))²``."""
    label_smoothing: Annotated[float, Meta(ge=0.0, lt=0.5)] = 0.0
    """Share of pairs assumed mislabelled (conservative DPO); ``sigmoid`` only."""
    length_norm: bool = False
    """Divide each completion's log-prob ratio by its token count (length-normalised DPO)."""
    reference: Literal["model", "data"] = "model"
    """``model``: a frozen copy of the initial policy scores each completion; ``data``: the
    items carry the reference's sequence log-probs (``ref_chosen_logprob``,
    ``ref_rejected_logprob``) and no reference model is built."""


class AlgorithmConfig(Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """The learning rule. See docs/algorithms.md for formulas and published presets."""

    mode: Literal["rl", "sft", "dpo"] = "rl"
    """``rl``: policy gradient on rewards; ``sft``: cross-entropy on the loss-masked tokens;
    ``dpo``: preference pairs (``[algorithm.dpo]``)."""
    estimator: Estimator = "grpo"
    """Advantage estimator."""
    loss_agg: LossAgg = "token-mean"
    """How per-token losses become one number."""
    clip_low: Probability = 0.2
    """Lower PPO clip range (ratio ≥ 1 − clip_low)."""
    clip_high: NonNegFloat = 0.2
    """Upper PPO clip range (ratio ≤ 1 + clip_high); > clip_low is DAPO's clip-higher."""
    dual_clip_c: Annotated[float, Meta(gt=1.0)] | None = None
    """Dual-clip constant for negative advantages (> 1), off when unset."""
    entropy_coef: NonNegFloat = 0.0
    """Entropy bonus coefficient."""
    kl: KLConfig = KLConfig()
    """KL control."""
    reference_on_cpu: bool = False
    """Keep the frozen reference model on CPU."""
    tis: TISConfig = TISConfig()
    """Train/inference mismatch correction."""
    old_logprobs: Literal["server", "recompute"] = "recompute"
    """Old log-probs of the ratio: the server's, or recomputed by the trainer before updating."""
    dynamic_sampling: bool = False
    """DAPO: drop groups with zero reward variance (counted)."""
    overlong: OverlongConfig = OverlongConfig()
    """Overlong penalty."""
    minibatches: PosInt = 1
    """Optimizer steps per training step (the batch is split into this many parts)."""
    epochs: PosInt = 1
    """Passes over the batch per training step."""
    prepare_batch: RefStr | None = None
    """``file.py:prepare_batch`` seam: receives batch tensors, returns advantages/extras."""
    loss: RefStr | None = None
    """``file.py:fn`` replacing the mode's built-in loss: it receives the micro-batch's per-token
    tensors (``dpo``: the pairs' sequence log-probs) and returns ``(loss, metrics)``
    (docs/algorithms.md, *Custom loss*). Unset: the built-in loss."""
    dpo: DPOConfig = DPOConfig()
    """DPO settings (``mode = "dpo"``)."""


class OptimConfig(Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """AdamW and the learning-rate schedule."""

    lr: PosFloat = 1e-5
    """Peak learning rate."""
    betas: Annotated[list[Probability], Meta(min_length=2, max_length=2)] = msgspec.field(
        default_factory=lambda: [0.9, 0.999]
    )
    """AdamW betas."""
    eps: PosFloat = 1e-8
    """AdamW epsilon."""
    weight_decay: NonNegFloat = 0.0
    """Decoupled weight decay."""
    max_grad_norm: PosFloat | None = 1.0
    """Gradient clipping by global norm; unset disables."""
    schedule: Literal["constant", "linear", "cosine"] = "constant"
    """LR schedule after warm-up."""
    warmup_steps: NonNegInt = 0
    """Linear warm-up steps."""
    min_lr_ratio: Probability = 0.0
    """Final LR as a fraction of ``lr`` (linear and cosine)."""


class TrainerConfig(Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Training ranks: device, packing, sharding, timeouts."""

    device: Literal["auto", "cpu", "cuda"] = "auto"
    """``auto`` uses CUDA when available."""
    micro_batch_tokens: PosInt = 8192
    """Token budget of one micro-batch: its tokens when packed, rows x longest row when padded."""
    packing: bool = True
    """Pack sequences padding-free where it pays; ``false`` pads every micro-batch to its
    longest row (rows bucketed by length). With a flash (varlen) kernel a micro-batch is always
    packed. Under SDPA or eager attention a packed micro-batch attends over a dense ``N x N``
    mask (pairs of rows that never see each other included), so the planner picks, per
    minibatch, whichever of the packed and the length-bucketed padded plan costs fewer FLOPs
    (``train.packing.plan_costs``): many short rows, as in the CPU demo, train padded."""
    share_prefix: bool = True
    """Compute a prompt shared by several rows of a padded micro-batch once (the samples of a
    group): the prompts as one batch with a KV cache, each row's own tokens attending to its
    prompt's cache. Exact (the padded forward up to float rounding); used where it saves at
    least a fifth of the token positions, at world size 1, without activation checkpointing
    (``train.prefix_sharing``)."""
    activation_checkpointing: bool = False
    """Recompute decoder layers in backward."""
    param_dtype: Literal["float32", "bfloat16"] = "float32"
    """FSDP2 parameter dtype on GPU (reductions stay float32)."""
    step_timeout_s: PosFloat = 1800.0
    """Deadline of one training step on every rank."""
    collective_timeout_s: PosFloat = 600.0
    """Deadline of torch.distributed collectives."""
    threads: PosInt | None = None
    """torch intra-op threads on CPU; defaults to torch's choice."""
    process: bool = False
    """Run the trainer in a process of its own (single-process runs, meant for CPU): the train
    step and the event loop then run on two cores instead of taking turns at Python's
    interpreter lock. The process is forked from the engine before its event loop starts (so it
    imports nothing again; spawned where forking is unsafe), and weights reach the engine
    through shared memory. Under torchrun (world size > 1) the ranks are processes already and
    this is ignored."""


class CheckpointConfig(Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Checkpoints and the final export."""

    every_steps: NonNegInt = 0
    """Checkpoint every N steps; 0 only at the end (if ``at_end``)."""
    keep_last: PosInt = 2
    """Checkpoints kept."""
    at_end: bool = True
    """Checkpoint when the run finishes."""
    on_sigterm: bool = True
    """On SIGTERM or the first Ctrl-C: finish the running step, checkpoint, then exit (a second
    signal stops at once)."""
    export_hf: bool = True
    """Export the final model as an HF safetensors folder."""
