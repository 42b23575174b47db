"""Train-step benchmark: our step's tokens/s against hand-written torch, packing's padding,
and the seconds one weight publication takes by ``disk`` and by ``distributed``.

Run::

    python benchmarks/train_step.py            # full (2-3 minutes on 2 busy cores)
    python benchmarks/train_step.py --quick    # tiny sizes (smoke run)
    python benchmarks/train_step.py --parts step --steps 9 --profile

Writes ``benchmarks/results/train_step.json`` and ``benchmarks/results/train_step.png``
(``--profile``: also ``train_step_profile.txt``). Every ratio is taken within one run.

(1) ``step``: tokens/s of ``train.Trainer.step`` (RL, GRPO, default config: old log-probs
recomputed, token-mean, clip 0.2, grad-norm 1.0, packing on, SDPA) on a :class:`TrainBatch` of
synthetic trajectories (a prompt per group, log-normal response lengths with a long tail to
``--max-len``) and a Qwen2 built with ``train/build.py``; also with ``trainer.packing = false``
for reference. Baselines run on models of the same config and seed over the SAME micro-batches
(the trainer's plan of the rows, the same packed ids and positions, a block-diagonal causal mask
built independently with ``torch.block_diag``): per micro-batch logits → log-softmax gather →
``-(A·exp(lp - old)·m).sum() / D`` → backward, then clip and AdamW with the trainer's
``[optim]``. Their tensors are prepared before timing.

- ``baseline``: that step (old = the rollout log-probs): what the 0.9 target compares to.
- ``baseline+recompute``: a no-grad forward over the micro-batches first (old log-probs
  recomputed, as ``old_logprobs = "recompute"`` does): the same algorithmic work as ours.

First the baseline's log-probs are checked against ``Trainer.compute_logprobs`` (same weights
and tokens; the max difference is reported). Then ``--warmup`` untimed and ``--steps`` timed
rounds, each running every runner once in a rotating order. The machine is shared, so a step is
timed by this process's CPU time (torch on ``--threads`` 1: CPU time is the work done) and by
wall time; tokens/s = real tokens per step / median seconds. Target: ours >= 0.9 x baseline.

(2) ``padding``: the share of token slots without a real token, over ``--padding-batches``
batches of ``--padding-rows`` rows, per token budget, for an RL length mix (``--padding-*``:
prompts of 32-256 tokens, log-normal responses) and for part (1)'s short mix: packed
micro-batches (first-fit decreasing; ``max(budget, tokens)`` slots each, as
``train/packing_plan.py`` counts: the budget a last, partly filled micro-batch leaves unused),
the least any packing can reach (``ceil(tokens / budget)`` micro-batches), padded micro-batches
(``rows · longest <= budget``), one batch padded to its longest row. Target: packed <= 5 % on
the RL mix at the trainer's default budget.

(3) ``publish`` (``train_step_publish.py``): wall seconds of ``weights.Publisher.publish`` for
a ~100M-parameter Qwen2 into one local server, by ``disk`` and by ``distributed`` at each
``--bucket-mb``. With ``--quick`` the server starts before part (1), so its start-up overlaps.
"""

from __future__ import annotations

import argparse
import math
import random
import statistics
import time
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from harness import RESULTS_DIR, machine, write_json
from nexrl_async.config.model import BuiltModel, CharTokenizer
from nexrl_async.config.training import AlgorithmConfig, OptimConfig, TrainerConfig
from nexrl_async.core.records import Group, TrainBatch, Trajectory, Turn, VersionToken
from nexrl_async.train import packing_plan as plans
from nexrl_async.train.build import build_char_tokenizer, build_model
from nexrl_async.train.microbatch import plan_micro_batches
from nexrl_async.train.tensors import SequenceBatch, sequences_from_batch
from nexrl_async.train.trainer import Trainer
from train_step_publish import measure_publish, publication_setup
from train_step_report import plot, print_summary

NAME = "train_step"
STEP_TARGET = 0.9
PADDING_TARGET = 0.05
FIRST_ID = 4
"""Synthetic token ids start after the char tokenizer's specials (pad, bos, eos, sep)."""
PHASES = (
    ("batch to tensors", "tensors.py", "sequences_from_batch"),
    ("pre-pass (no-grad log-probs + entropy)", "trainer.py", "_pre_pass"),
    ("recompute pass (no-grad log-probs)", "train_step.py", "old_logprobs"),
    ("targets (advantages)", "targets.py", "build_targets"),
    ("forward + loss", "loss.py", "__call__"),
    ("forward + loss", "train_step.py", "micro_loss"),
    ("backward", "~", "run_backward"),
    ("clip grad norm", "clip_grad.py", "clip_grad_norm_"),
    ("AdamW", "adam.py", "step"),
    ("AdamW", "adamw.py", "step"),
)
"""``(label, file suffix, function)`` whose cumulative CPU time ``--profile`` reports."""

# ---- synthetic data -------------------------------------------------------------------------


def response_length(rng: random.Random, median: int, sigma: float, max_len: int) -> int:
    """Log-normal (median ``median``, log-sd ``sigma``), clipped to ``1..max_len``."""
    return min(max_len, max(1, round(rng.lognormvariate(math.log(median), sigma))))


def synthetic_batch(args: argparse.Namespace, *, vocab_size: int, seed: int) -> TrainBatch:
    """``--groups`` x ``--group-size`` trajectories: a prompt of 8-32 tokens per group, random
    tokens, long-tailed responses with server log-probs, random rewards."""
    rng = random.Random(seed)
    token = VersionToken(lease_id=0, version=0)
    groups = []
    for g in range(args.groups):
        prompt = [rng.randrange(FIRST_ID, vocab_size) for _ in range(rng.randint(8, 32))]
        trajectories = []
        for s in range(args.group_size):
            n = response_length(rng, args.median_len, args.sigma, args.max_len)
            answer = [rng.randrange(FIRST_ID, vocab_size) for _ in range(n)]
            logprobs = [-rng.uniform(0.5, 8.0) for _ in range(n)]
            turns = [
                Turn(role="user", token_ids=prompt, loss_mask=[0] * len(prompt)),
                Turn(role="assistant", token_ids=answer, loss_mask=[1] * n, logprobs=logprobs),
            ]
            trajectories.append(
                Trajectory(
                    group_id=f"g{g}",
                    item_key=f"{g}:0",
                    sample_index=s,
                    token=token,
                    turns=turns,
                    reward=rng.random(),
                )
            )
        groups.append(
            Group(group_id=f"g{g}", item_key=f"{g}:0", token=token, trajectories=trajectories)
        )
    return TrainBatch(step=0, groups=groups)


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


# ---- the hand-written baseline --------------------------------------------------------------


@dataclass(frozen=True)
class PackedMicro:
    """One packed micro-batch for the baseline: ``N`` tokens, ``N - 1`` predictions."""

    rows: list[int]
    input_ids: Tensor  # [1, N]
    position_ids: Tensor  # [1, N]
    mask: Tensor  # [1, 1, N, N] bool, block-diagonal causal
    targets: Tensor  # [N - 1] the token each position predicts
    weights: Tensor  # [N - 1] loss mask (0 where the next token starts another row)
    advantages: Tensor  # [N - 1]
    rollout_logprobs: Tensor  # [N - 1]


def pack_micro(seq: SequenceBatch, rows: list[int], advantages: Tensor) -> PackedMicro:
    lengths = [int(seq.lengths[r]) for r in rows]
    pairs = list(zip(rows, lengths, strict=True))
    ids = torch.cat([seq.input_ids[r, :n] for r, n in pairs])
    zero = torch.zeros(1)

    def shifted(values: Tensor) -> Tensor:
        """Row ``r``'s ``values[r, 1:n]`` then 0, concatenated, last dropped: ``[N - 1]``."""
        return torch.cat([torch.cat([values[r, 1:n], zero]) for r, n in pairs])[:-1]

    blocks = [torch.ones(n, n, dtype=torch.bool).tril() for n in lengths]
    return PackedMicro(
        rows=rows,
        input_ids=ids[None],
        position_ids=torch.cat([torch.arange(n) for n in lengths])[None],
        mask=torch.block_diag(*blocks)[None, None],  # type: ignore[no-untyped-call]
        targets=ids[1:],
        weights=shifted(seq.loss_mask),
        advantages=torch.cat([advantages[r].expand(n) for r, n in pairs])[:-1],
        rollout_logprobs=shifted(seq.rollout_logprobs),
    )


class BaselineStep:
    """The hand-written step over prepared micro-batches (see the module docstring)."""

    def __init__(
        self, model: Any, micro: list[PackedMicro], optim: OptimConfig, *, recompute: bool
    ) -> None:
        self.model = model
        self.micro = micro
        self.recompute = recompute
        self.denominator = sum(float(mb.weights.sum()) for mb in micro)
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.max_norm = optim.max_grad_norm or math.inf
        self.optimizer = torch.optim.AdamW(
            self.params, lr=optim.lr, betas=(optim.betas[0], optim.betas[1]), eps=optim.eps,
            weight_decay=optim.weight_decay,
        )  # fmt: skip

    def logprobs(self, mb: PackedMicro) -> Tensor:
        """``[N - 1]`` log-probs of each position's next token."""
        out = self.model(
            input_ids=mb.input_ids,
            position_ids=mb.position_ids,
            attention_mask=mb.mask,
            use_cache=False,
        )
        logits = out.logits[0, :-1].float()
        return torch.log_softmax(logits, dim=-1).gather(-1, mb.targets[:, None])[:, 0]

    @torch.no_grad()
    def old_logprobs(self) -> list[Tensor]:
        self.model.eval()
        return [self.logprobs(mb) for mb in self.micro]

    def micro_loss(self, mb: PackedMicro, old: Tensor) -> Tensor:
        ratio = torch.exp(self.logprobs(mb) - old)
        return -(mb.advantages * ratio * mb.weights).sum() / self.denominator

    def step(self) -> None:
        olds = self.old_logprobs() if self.recompute else [m.rollout_logprobs for m in self.micro]
        self.model.train()
        for mb, old in zip(self.micro, olds, strict=True):
            self.micro_loss(mb, old).backward()  # type: ignore[no-untyped-call]
        torch.nn.utils.clip_grad_norm_(self.params, self.max_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)


# ---- (1) train step -------------------------------------------------------------------------


def new_model(cfg: BuiltModel, vocab_size: int) -> Any:
    return build_model(
        cfg, vocab_size=vocab_size, seed=0, pad_token_id=0, bos_token_id=1, eos_token_id=2
    )


def logprob_gap(trainer: Trainer, base: BaselineStep, batch: TrainBatch) -> float:
    """Max |trainer - baseline| log-prob over every predicted token (same weights)."""
    ours = trainer.compute_logprobs(batch)
    gap = 0.0
    for mb, lp in zip(base.micro, base.old_logprobs(), strict=True):
        start = 0
        for row in mb.rows:
            n = len(ours[row])
            diff = lp[start : start + n - 1] - torch.tensor(ours[row][1:])
            gap, start = max(gap, float(diff.abs().max())), start + n
    return gap


def timed_rounds(
    runners: dict[str, Callable[[], object]], warmup: int, steps: int
) -> dict[str, dict[str, list[float]]]:
    """CPU and wall seconds of each runner's timed steps; a round runs each once, rotating."""
    names = list(runners)
    times: dict[str, dict[str, list[float]]] = {n: {"cpu_s": [], "wall_s": []} for n in names}
    for i in range(warmup + steps):
        for name in names[i % len(names) :] + names[: i % len(names)]:
            cpu, wall = time.process_time(), time.perf_counter()
            runners[name]()
            cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
            if i >= warmup:
                times[name]["cpu_s"].append(cpu)
                times[name]["wall_s"].append(wall)
            label = "warm-up" if i < warmup else "timed"
            print(
                f"  {label} {i + 1}/{warmup + steps} {name}: cpu {cpu:.2f} s, wall {wall:.2f} s",
                flush=True,
            )
    return times


def summarise_runs(times: dict[str, dict[str, list[float]]], tokens: int) -> dict[str, Any]:
    """Per runner: step seconds, their medians, tokens/s by CPU and by wall time."""
    runs: dict[str, Any] = {}
    for name, t in times.items():
        cpu, wall = statistics.median(t["cpu_s"]), statistics.median(t["wall_s"])
        runs[name] = {
            **t, "median_cpu_s": cpu, "median_wall_s": wall,
            "tokens_per_cpu_s": tokens / cpu, "tokens_per_wall_s": tokens / wall,
        }  # fmt: skip
    return runs


@dataclass
class StepSetup:
    """Part (1)'s batch, our trainers (packing on, off) and the baselines."""

    batch: TrainBatch
    seq: SequenceBatch
    plan: list[list[int]]
    trainer: Trainer
    unpacked: Trainer
    bases: dict[str, BaselineStep]


def step_setup(args: argparse.Namespace, optim: OptimConfig | None = None) -> StepSetup:
    """Our trainers (packing on and off) and the two baselines, each on its own model of the
    same config and seed, all optimising with ``optim`` (default ``OptimConfig()``)."""
    cfg = BuiltModel(
        hidden_size=args.hidden, intermediate_size=args.intermediate, num_hidden_layers=args.layers,
        num_attention_heads=args.heads, max_position_embeddings=max(2048, 2 * args.max_len),
    )  # fmt: skip
    optim = optim or OptimConfig()
    batch = synthetic_batch(args, vocab_size=args.vocab, seed=args.seed)
    trainer, unpacked = (
        Trainer(
            new_model(cfg, args.vocab), build_char_tokenizer(CharTokenizer()),
            algorithm=AlgorithmConfig(), optim=optim, max_new_tokens=args.max_len,
            trainer=TrainerConfig(device="cpu", micro_batch_tokens=args.micro_batch_tokens,
                                  packing=packing),
        )
        for packing in (True, False)
    )  # fmt: skip
    seq = sequences_from_batch(batch, pad_token_id=0)
    plan = plan_micro_batches(seq.lengths, range(seq.size), args.micro_batch_tokens)
    micro = [pack_micro(seq, rows, grpo_advantages(seq)) for rows in plan]
    bases = {
        name: BaselineStep(new_model(cfg, args.vocab), micro, optim, recompute=recompute)
        for name, recompute in (("baseline", False), ("baseline+recompute", True))
    }
    return StepSetup(batch, seq, plan, trainer, unpacked, bases)


def measure_step(args: argparse.Namespace) -> dict[str, Any]:
    setup = step_setup(args)
    seq, plan, trainer = setup.seq, setup.plan, setup.trainer
    gap = logprob_gap(trainer, setup.bases["baseline"], setup.batch)
    lengths = [int(n) for n in seq.lengths]
    tokens, params = sum(lengths), sum(p.numel() for p in trainer.model.parameters())
    print(f"step: {params / 1e6:.2f}M params, {seq.size} rows, {tokens} tokens, "
          f"{len(plan)} micro-batches, log-prob gap {gap:.1e}", flush=True)  # fmt: skip
    runners: dict[str, Callable[[], object]] = {
        "ours": lambda: trainer.step(setup.batch),
        "ours, packing off": lambda: setup.unpacked.step(setup.batch),
    }
    runners.update({name: base.step for name, base in setup.bases.items()})
    runs = summarise_runs(timed_rounds(runners, args.warmup, args.steps), tokens)
    ratios = {
        f"{other}_{clock}": runs["ours"][f"tokens_per_{clock}_s"]
        / runs[other][f"tokens_per_{clock}_s"]
        for other in ("baseline", "baseline+recompute")
        for clock in ("cpu", "wall")
    }
    budget = args.micro_batch_tokens
    padding = plans.padding_fraction(lengths, plan, packed=True, budget=budget)
    return {
        "model": {"architecture": "qwen2", "params": params, "dtype": "float32",
                  "hidden": args.hidden, "layers": args.layers, "vocab": args.vocab},
        "batch": {"rows": seq.size, "tokens": tokens, "max_len": max(lengths),
                  "median_len": statistics.median(lengths), "micro_batches": len(plan),
                  "micro_batch_tokens": budget, "padding_frac": padding},
        "logprob_max_abs_diff": gap, "torch_threads": torch.get_num_threads(), "runs": runs,
        "ratios": ratios, "ratio_vs_baseline": ratios["baseline_cpu"], "target": STEP_TARGET,
        "passed": ratios["baseline_cpu"] >= STEP_TARGET,
        "phases_cpu_s": profile_steps(runners, args.out_dir) if args.profile else None,
    }  # fmt: skip


def profile_steps(runners: dict[str, Callable[[], object]], out_dir: Path) -> dict[str, Any]:
    """One step of each runner under cProfile on CPU time (the :data:`PHASES`' cumulative
    seconds are returned) and one under torch.profiler (top ops by self CPU time); both
    written to ``<out_dir>/train_step_profile.txt``."""
    import cProfile
    import io
    import pstats

    from torch.profiler import ProfilerActivity, profile

    phases: dict[str, dict[str, float]] = {}
    texts = []
    for name, run in runners.items():
        python = cProfile.Profile(time.process_time)
        python.runcall(run)
        text = io.StringIO()
        stats = pstats.Stats(python, stream=text)
        stats.sort_stats("cumulative").print_stats(40)
        found = phases.setdefault(name, {"total": stats.total_tt})  # type: ignore[attr-defined]
        for (path, _, func), row in stats.stats.items():  # type: ignore[attr-defined]
            for label, suffix, wanted in PHASES:
                if path.endswith(suffix) and wanted in func:
                    found[label] = found.get(label, 0.0) + row[3]
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            run()
        ops = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25)
        texts.append(
            f"==== {name}: cProfile (CPU s) ====\n{text.getvalue()}\n"
            f"==== {name}: torch ops ====\n{ops}"
        )
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{NAME}_profile.txt").write_text("\n\n".join(texts), encoding="utf-8")
    return phases


# ---- (2) padding ----------------------------------------------------------------------------


def row_lengths(rng: random.Random, mix: dict[str, Any], rows: int) -> list[int]:
    """Prompt (uniform) plus response (log-normal) tokens of ``rows`` rows of a length mix."""
    low, high = mix["prompt"]
    return [
        rng.randint(low, high) + response_length(rng, mix["median"], mix["sigma"], mix["max"])
        for _ in range(rows)
    ]


def packing_bound(lengths: Sequence[int], budget: int) -> float:
    """The least packed padding fraction any plan can reach: rows over the budget alone, the
    rest in ``ceil(tokens / budget)`` micro-batches (only the last one partly empty)."""
    rest = sum(n for n in lengths if n <= budget)
    slots = sum(n for n in lengths if n > budget) + math.ceil(rest / budget) * budget
    return 1.0 - sum(lengths) / slots


def padding_fractions(lengths: list[int], budget: int) -> dict[str, float]:
    packed = plans.plan_micro_batches(lengths, budget)
    padded = plans.plan_padded_micro_batches(lengths, budget)
    return {
        "packed": plans.padding_fraction(lengths, packed, packed=True, budget=budget),
        "packed_bound": packing_bound(lengths, budget),
        "padded": plans.padding_fraction(lengths, padded, packed=False),
        "pad_to_longest": plans.padding_fraction(
            lengths, [list(range(len(lengths)))], packed=False
        ),
    }


def _mean_max(runs: list[dict[str, float]]) -> dict[str, dict[str, float]]:
    return {k: {"mean": statistics.fmean(r[k] for r in runs), "max": max(r[k] for r in runs)}
            for k in runs[0]}  # fmt: skip


def measure_padding(args: argparse.Namespace) -> dict[str, Any]:
    """Padding fractions of the RL mix (``--padding-*``; the target) and of part (1)'s mix."""
    rl = {"prompt": [32, 256], "median": args.padding_median_len, "sigma": args.padding_sigma,
          "max": args.padding_max_len}  # fmt: skip
    short = {"prompt": [8, 32], "median": args.median_len, "sigma": args.sigma, "max": args.max_len}
    rng = random.Random(args.seed + 1)
    mixes: dict[str, Any] = {}
    for name, mix in (("rl", rl), ("step", short)):
        found: dict[int, list[dict[str, float]]] = {b: [] for b in args.budgets}
        for _ in range(args.padding_batches):
            lengths = row_lengths(rng, mix, args.padding_rows)
            for budget in args.budgets:
                found[budget].append(padding_fractions(lengths, budget))
        budgets = {str(b): _mean_max(runs) for b, runs in found.items()}
        mixes[name] = {"length_mix": mix, "budgets": budgets}
    at_default = mixes["rl"]["budgets"].get(str(args.default_budget), {})
    worst = at_default.get("packed", {}).get("max", math.nan)
    return {
        "rows": args.padding_rows, "batches": args.padding_batches, "mixes": mixes,
        "default_budget": args.default_budget, "packed_max_at_default": worst,
        "target": PADDING_TARGET, "passed": worst <= PADDING_TARGET,
    }  # fmt: skip


# ---- command line ---------------------------------------------------------------------------

QUICK = {
    "steps": 2, "warmup": 1, "groups": 2, "group_size": 4, "median_len": 24, "max_len": 96,
    "hidden": 32, "intermediate": 64, "layers": 2, "heads": 2, "vocab": 64,
    "micro_batch_tokens": 128, "padding_rows": 64, "padding_batches": 3, "budgets": [512, 1024],
    "default_budget": 1024, "publish_hidden": 64, "publish_intermediate": 128,
    "publish_layers": 2, "publish_heads": 2, "publish_vocab": 256, "publish_rounds": 2,
    "bucket_mb": [1],
}  # fmt: skip
"""``--quick`` overrides: tiny sizes."""


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    add = parser.add_argument
    add("--quick", action="store_true", help="tiny sizes, few steps (smoke run)")
    add("--out-dir", type=Path, default=RESULTS_DIR, help="where JSON and PNG go")
    parts = ["step", "padding", "publish"]
    add("--parts", nargs="+", choices=parts, default=parts, help="what to measure")
    add("--threads", type=int, default=1, help="torch intra-op threads of this process")
    add("--seed", type=int, default=0)
    add("--profile", action="store_true", help="profile one more step of each runner")
    step = parser.add_argument_group("(1) train step").add_argument
    step("--steps", type=int, default=9, help="timed rounds")
    step("--warmup", type=int, default=2, help="untimed rounds first")
    step("--groups", type=int, default=4)
    step("--group-size", type=int, default=8)
    step("--median-len", type=int, default=40, help="median response tokens")
    step("--sigma", type=float, default=0.9, help="log-normal sigma of response lengths")
    step("--max-len", type=int, default=512, help="longest response (max_new_tokens)")
    step("--hidden", type=int, default=128)
    step("--intermediate", type=int, default=512)
    step("--layers", type=int, default=4)
    step("--heads", type=int, default=4)
    step("--vocab", type=int, default=2048)
    step("--micro-batch-tokens", type=int, default=1024, help="trainer.micro_batch_tokens")
    pad = parser.add_argument_group("(2) padding").add_argument
    pad("--padding-rows", type=int, default=512, help="rows per batch")
    pad("--padding-median-len", type=int, default=400, help="median response of the RL mix")
    pad("--padding-sigma", type=float, default=1.0, help="log-normal sigma of the RL mix")
    pad("--padding-max-len", type=int, default=4096, help="longest response of the RL mix")
    pad("--padding-batches", type=int, default=20)
    pad("--budgets", type=int, nargs="+", default=[4096, 8192, 16384])
    pad("--default-budget", type=int, default=8192, help="the trainer's default budget")
    pub = parser.add_argument_group("(3) publication (defaults: 97.6M parameters)").add_argument
    pub("--publish-hidden", type=int, default=768)
    pub("--publish-intermediate", type=int, default=2048)
    pub("--publish-layers", type=int, default=12)
    pub("--publish-heads", type=int, default=12)
    pub("--publish-vocab", type=int, default=16384)
    pub("--publish-dtype", choices=["float32", "bfloat16"], default="float32")
    pub("--publish-rounds", type=int, default=5, help="publications per transport")
    pub("--bucket-mb", type=int, nargs="+", default=[256, 32], help="weights.bucket_mb values")
    args = parser.parse_args(argv)
    if args.quick:
        for key, value in QUICK.items():
            setattr(args, key, value)
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    settings = {k: v for k, v in vars(args).items() if k not in ("out_dir", "quick")}
    results: dict[str, Any] = {
        "benchmark": NAME, "machine": machine(), "quick": args.quick,
        "settings": {**settings, "out_dir": str(args.out_dir)},
    }  # fmt: skip
    with ExitStack() as stack:
        setup = None
        if "publish" in args.parts and args.quick:  # the server starts while (1) runs
            setup = stack.enter_context(publication_setup(args))
        if "step" in args.parts:
            results["step"] = measure_step(args)
        if "padding" in args.parts:
            results["padding"] = measure_padding(args)
        if "publish" in args.parts:
            setup = setup or stack.enter_context(publication_setup(args))
            results["publish"] = measure_publish(args, setup)
    results["machine_after"] = machine()
    json_path = write_json(args.out_dir, NAME, results)
    png_path = plot(results, args.out_dir, NAME)
    print_summary(results)
    print(f"\nresults: {json_path}\nplot:    {png_path}")
    return results


if __name__ == "__main__":
    main()
