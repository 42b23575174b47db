"""The train-step benchmark's rows (two shapes) and its baseline: a plain padded torch step.

Shapes (``benchmarks/train_step.py --shapes``):

- ``demo``: the reverse-digits recipe (``recipes/reverse_digits/recipe.toml``) as it trains: its
  ``[model]``, ``[tokenizer]``, ``[algorithm]`` (entropy bonus 0.01), ``[optim]`` and
  ``[trainer]``; 32 groups x 8 rows of a 4-token prompt (``<bos>``, two digits, ``<sep>``) and
  1-3 response tokens (mostly 3), ~1,700 tokens a step.
- ``long-tail``: synthetic groups (a prompt of 8-32 tokens each, log-normal responses with a
  long tail to ``--max-len``), the default ``[algorithm]`` and ``[optim]``, a built Qwen2 of
  ``--hidden``/``--layers``/...: where packing's padding-free layout pays.

The baseline, :class:`PaddedStep`, is what a hand-written loop does: every row right-padded to
the batch's longest, one forward and backward over the ``[B, T]`` batch with the same loss as
ours (PPO-clip on the forward's own detached log-probs, as ours with one minibatch and epoch,
token-mean, the entropy bonus when the algorithm has one), gradient clipping, one AdamW step.
Its tensors (ids, masks, GRPO advantages) are prepared before timing.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from nexrl_async.config.loader import load_recipe
from nexrl_async.config.model import BuiltModel, CharTokenizer
from nexrl_async.config.training import AlgorithmConfig, OptimConfig, TrainerConfig
from nexrl_async.core.records import Group, TrainBatch, Trajectory, Turn, VersionToken
from nexrl_async.train import step as train_step_module
from nexrl_async.train.build import build_char_tokenizer, build_model
from nexrl_async.train.ranks import lockstep
from nexrl_async.train.tensors import SequenceBatch
from nexrl_async.train.trainer import Trainer

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "reverse_digits" / "recipe.toml"
FIRST_ID = 4
"""Synthetic token ids start after the char tokenizer's specials (pad, bos, eos, sep)."""
DEMO_RESPONSES = (1, 2, 3)
DEMO_WEIGHTS = (0.05, 0.1, 0.85)
"""Tokens of a demo response (two digits and EOS, or cut at max_new_tokens) and their odds."""
TOKEN = VersionToken(lease_id=0, version=0)


@dataclass(frozen=True)
class Shape:
    """One shape of rows: the model to build, the trainer's config sections and a batch."""

    name: str
    model: BuiltModel
    vocab: int
    tokenizer: CharTokenizer
    algorithm: AlgorithmConfig
    optim: OptimConfig
    trainer: TrainerConfig
    max_new_tokens: int
    batch: TrainBatch

    def new_model(self) -> Any:
        """The model, seed 0 (every runner gets its own copy of the same weights)."""
        return build_model(
            self.model, vocab_size=self.vocab, seed=0, pad_token_id=0, bos_token_id=1,
            eos_token_id=2,
        )  # fmt: skip

    def new_trainer(self, *, packing: bool = True) -> Trainer:
        trainer = TrainerConfig(
            device="cpu", micro_batch_tokens=self.trainer.micro_batch_tokens, packing=packing
        )
        return Trainer(
            self.new_model(), build_char_tokenizer(self.tokenizer), algorithm=self.algorithm,
            optim=self.optim, trainer=trainer, max_new_tokens=self.max_new_tokens,
        )  # fmt: skip


# ---- the rows -------------------------------------------------------------------------------


def _trajectory(g: int, s: int, prompt: list[int], answer: list[int], reward: float) -> Trajectory:
    n = len(answer)
    turns = [
        Turn(role="user", token_ids=prompt, loss_mask=[0] * len(prompt)),
        Turn(role="assistant", token_ids=answer, loss_mask=[1] * n, logprobs=[-1.0] * n),
    ]
    return Trajectory(
        group_id=f"g{g}", item_key=f"{g}:0", sample_index=s, token=TOKEN, turns=turns,
        reward=reward,
    )  # fmt: skip


def _batch(groups: list[list[Trajectory]]) -> TrainBatch:
    return TrainBatch(
        step=0,
        groups=[
            Group(group_id=t[0].group_id, item_key=t[0].item_key, token=TOKEN, trajectories=t)
            for t in groups
        ],
    )


def demo_batch(groups: int, group_size: int, *, vocab: int, seed: int) -> TrainBatch:
    """Reverse-digits rows: ``<bos> d d <sep>``, then 1-3 response tokens
    (:data:`DEMO_RESPONSES`)."""
    rng = random.Random(seed)
    out = []
    for g in range(groups):
        prompt = [1, rng.randrange(FIRST_ID, vocab), rng.randrange(FIRST_ID, vocab), 3]
        out.append([
            _trajectory(g, s, prompt, [rng.randrange(FIRST_ID, vocab) for _ in range(n)],
                        rng.random())
            for s, n in enumerate(rng.choices(DEMO_RESPONSES, DEMO_WEIGHTS, k=group_size))
        ])  # fmt: skip
    return _batch(out)


def response_length(rng: random.Random, median: int, sigma: float, max_len: int) -> int:
    """Log-normal (median ``median``, log-sd ``sigma``), clipped to ``1..max_len``."""
    return min(max_len, max(1, round(rng.lognormvariate(math.log(median), sigma))))


def synthetic_batch(args: Any, *, vocab_size: int, seed: int) -> TrainBatch:
    """``--groups`` x ``--group-size`` trajectories: a prompt of 8-32 tokens per group, random
    tokens, long-tailed responses with server log-probs, random rewards."""
    rng = random.Random(seed)
    out = []
    for g in range(args.groups):
        prompt = [rng.randrange(FIRST_ID, vocab_size) for _ in range(rng.randint(8, 32))]
        trajectories = []
        for s in range(args.group_size):
            n = response_length(rng, args.median_len, args.sigma, args.max_len)
            answer = [rng.randrange(FIRST_ID, vocab_size) for _ in range(n)]
            trajectories.append(_trajectory(g, s, prompt, answer, rng.random()))
        out.append(trajectories)
    return _batch(out)


def demo_shape(args: Any) -> Shape:
    cfg = load_recipe(RECIPE).config
    assert isinstance(cfg.model, BuiltModel)
    assert isinstance(cfg.tokenizer, CharTokenizer)
    vocab = len(build_char_tokenizer(cfg.tokenizer))
    batch = demo_batch(cfg.pool.batch_groups, cfg.rollout.group_size, vocab=vocab, seed=args.seed)
    return Shape(
        name="demo", model=cfg.model, vocab=vocab, tokenizer=cfg.tokenizer,
        algorithm=cfg.algorithm, optim=cfg.optim, trainer=cfg.trainer,
        max_new_tokens=cfg.rollout.max_new_tokens, batch=batch,
    )  # fmt: skip


def long_tail_shape(args: Any, optim: OptimConfig | None = None) -> Shape:
    model = BuiltModel(
        hidden_size=args.hidden, intermediate_size=args.intermediate, num_hidden_layers=args.layers,
        num_attention_heads=args.heads, max_position_embeddings=max(2048, 2 * args.max_len),
    )  # fmt: skip
    return Shape(
        name="long-tail", model=model, vocab=args.vocab, tokenizer=CharTokenizer(),
        algorithm=AlgorithmConfig(),
        optim=optim or OptimConfig(), max_new_tokens=args.max_len,
        trainer=TrainerConfig(device="cpu", micro_batch_tokens=args.micro_batch_tokens),
        batch=synthetic_batch(args, vocab_size=args.vocab, seed=args.seed),
    )  # fmt: skip


# ---- the baseline ---------------------------------------------------------------------------


def grpo_advantages(seq: SequenceBatch) -> Tensor:
    """``[B]`` GRPO advantages ``(r - mean_g) / (std_g + 1e-6)``, unbiased std (0 for a group
    of one), as ``algorithms.group_advantages`` defines them."""
    adv = torch.zeros_like(seq.rewards)
    for g in sorted(set(seq.group_index.tolist())):
        rows = seq.group_index == g
        r = seq.rewards[rows]
        if r.numel() > 1:
            adv[rows] = (r - r.mean()) / (r.std() + 1e-6)
    return adv


class PaddedStep:
    """The plain padded torch step (module docstring) on one prepared ``[B, T]`` batch."""

    def __init__(self, model: Any, seq: SequenceBatch, shape: Shape) -> None:
        self.model, self.algo = model, shape.algorithm
        self.input_ids, self.attention_mask = seq.input_ids, seq.attention_mask
        self.targets = seq.input_ids[:, 1:, None]
        self.weights = seq.loss_mask[:, 1:]
        self.advantages = grpo_advantages(seq)[:, None]
        self.denominator = self.weights.sum()
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.max_norm = shape.optim.max_grad_norm or math.inf
        optim = shape.optim
        self.optimizer = torch.optim.AdamW(
            self.params, lr=optim.lr, betas=(optim.betas[0], optim.betas[1]), eps=optim.eps,
            weight_decay=optim.weight_decay,
        )  # fmt: skip

    def log_softmax(self) -> Tensor:
        """``[B, T - 1, V]``: each position's next-token log-distribution."""
        out = self.model(
            input_ids=self.input_ids, attention_mask=self.attention_mask, use_cache=False
        )
        return torch.log_softmax(out.logits[:, :-1].float(), dim=-1)

    def loss(self) -> Tensor:
        logp = self.log_softmax()
        lp = logp.gather(-1, self.targets)[..., 0]
        ratio = torch.exp(lp - lp.detach())
        low, high = 1.0 - self.algo.clip_low, 1.0 + self.algo.clip_high
        pg = torch.maximum(-self.advantages * ratio, -self.advantages * ratio.clamp(low, high))
        loss = (pg * self.weights).sum() / self.denominator
        if self.algo.entropy_coef > 0:
            entropy = -(logp.exp() * logp).sum(-1)
            loss = loss - self.algo.entropy_coef * (entropy * self.weights).sum() / self.denominator
        return loss

    def step(self) -> None:
        self.model.train()
        self.loss().backward()  # type: ignore[no-untyped-call]
        torch.nn.utils.clip_grad_norm_(self.params, self.max_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    @torch.no_grad()
    def logprobs(self) -> Tensor:
        """``[B, T]`` log-probs of every token (0 in column 0 and on padding), eval mode."""
        self.model.eval()
        lp = self.log_softmax().gather(-1, self.targets)[..., 0]
        return torch.nn.functional.pad(lp, (1, 0)) * self.attention_mask


def logprob_gap(trainer: Trainer, base: PaddedStep, batch: TrainBatch) -> float:
    """Max |ours - baseline| log-prob over every token (same weights)."""
    ours = trainer.compute_logprobs(batch)
    theirs = base.logprobs()
    return max(
        float((torch.tensor(row) - theirs[i, : len(row)]).abs().max()) for i, row in enumerate(ours)
    )


@contextmanager
def always_packed() -> Iterator[None]:
    """Our step as it was before plans had a cost model: every micro-batch packed, so under
    SDPA one dense block-diagonal ``[N, N]`` mask per micro-batch."""
    modules = (train_step_module, lockstep)  # where the trainer's paths look plan_costs up
    saved = [getattr(module, "plan_costs") for module in modules]  # noqa: B009
    for module in modules:
        setattr(module, "plan_costs", lambda model: None)  # noqa: B010
    try:
        yield
    finally:
        for module, original in zip(modules, saved, strict=True):
            setattr(module, "plan_costs", original)  # noqa: B010
