"""End-to-end benchmark: the CPU demo task trained by the engine and by a hand-written loop.

Run::

    python benchmarks/e2e.py                   # both, the recipe's 350 steps (~6-30 min, 2 cores)
    python benchmarks/e2e.py --steps 250       # enough to cross val/reward_mean 0.8
    python benchmarks/e2e.py --skip-engine --steps 50
    python benchmarks/e2e.py --skip-loop --set rollout.workers=8 --set inference.max_batch=128

Writes ``benchmarks/results/e2e.json`` and ``benchmarks/results/e2e.png`` (val/reward_mean
against wall seconds for both; seconds per step over the steps). The runs go one after the
other, never concurrently: the machine has 2 cores and each run uses both (the engine: trainer
+ server process, one torch thread each) or one (the loop). The loop runs twice, before and
after the engine, and the loop's figures are the means of both (``loop_runs`` in the JSON has
each): a shared machine's speed drifts by 10-20% within minutes, and a loop measured on one
side of the engine only turned the same code's ratio from 0.8 to 1.2 between seeds
(``--loop-once`` runs it after the engine only).

The task is ``recipes/reverse_digits/recipe.toml`` with ``recipes/reverse_digits/task.py``.

(a) **engine**: ``python -m nexrl_async run RECIPE --output <tmp>/run --set run.total_steps=N
[--set run.seed=S] [--set ...]`` as a subprocess. From ``<tmp>/run/metrics.jsonl`` (one JSON
object per step: ``step``, ``time`` = ``time.time()`` when logged, the metrics): seconds per
step = median of ``timing/step_s`` (the wall lap of one loop iteration: waiting for the batch,
the train step, the publication, and the validation that falls due after it) over steps >= 2.
Validation times come from ``<tmp>/run/events.jsonl``'s ``validated`` events (``time.time()``
when the validation finished, same clock as the benchmark); without that file, from the
``time`` of the metrics line carrying ``val/*`` (an upper bound: that line is written after the
following train step). Time to target = the first validation with ``val/reward_mean >= 0.8``
minus the wall time at which the benchmark launched the subprocess (so it includes Python
start-up, imports, the inference server's start and the step-0 validation); the time since the
engine's own ``run_started`` event is reported too. CPU seconds: of the engine's process tree
(``RUSAGE_CHILDREN`` after it exits: the trainer process and its reaped server), of this process
for the loop; per step = the whole run's CPU / steps. On a shared machine wall seconds depend on
the others' load (the JSON keeps the 1-minute load average before and after each run); CPU
seconds much less so.

(b) **loop**: a single-process GRPO loop written here, on one torch thread. It is "the same" as
the engine's run in:

- tokenizer and initial weights: ``nexrl_async.train.build``'s ``build_char_tokenizer`` and
  ``build_model`` on the recipe's ``[tokenizer]`` / ``[model]`` with seed ``run.seed``, as the
  trainer does (when both run, the engine's ``<run>/model`` weights are compared to ours:
  ``initial_weights_max_abs_diff`` in the JSON must be 0);
- prompts: ``task.make_items(**[data].kwargs)`` in the source's order (epoch 0 shuffled with
  ``random.Random(data.seed)``, the engine's default ``shuffle = true, seed = 0``), each prompt
  encoded without added special tokens (``apply_chat_template = false``), ``batch_groups`` (32)
  prompts x ``group_size`` (8) samples a step;
- sampling: temperature 1.0 over the whole vocabulary, at most ``max_new_tokens`` (3) tokens,
  stop at EOS (kept in the response, in the loss); KV-cache decoding written here;
- reward: ``task.reward(answer, decoded.strip())`` (``task.positional_accuracy`` in a task
  without ``reward``) with special tokens skipped in the decoding, i.e. ``ReverseEvaluator``'s
  reward (and its ``exact`` metric);
- zero-variance filtering (``pool.filter_zero_variance`` or ``algorithm.dynamic_sampling``):
  groups whose rewards are all equal are dropped and more prompts are sampled, in source order,
  until the step has ``batch_groups`` groups; surplus groups of the last draw wait for the next
  step, as they would in the engine's pool (``data.epochs`` passes, epoch ``e`` shuffled with
  ``random.Random(data.seed + e)``);
- update: GRPO advantages ``(r - mean_g) / (std_g + 1e-6)`` (unbiased std, 0 for a flat group,
  ``algorithms.group_advantages``), token-mean PPO-clip loss (clip 0.2) with one optimizer step
  per batch (ratio 1: plain policy gradient) minus ``entropy_coef`` (0.01) x the token-mean
  entropy, log-probs and entropies of the logits divided by the sampling temperature (as the
  trainer does), AdamW (lr 1e-3, betas 0.9/0.999, eps 1e-8, weight decay 0), grad-norm clip
  1.0, ``[optim]``'s schedule (``train.schedule.lr_multiplier``: warm-up, constant / linear /
  cosine to ``min_lr_ratio``), stepped once per training step;
- validation: before training, every ``every_steps`` (25) steps and at the end, on the 64
  items of ``[validation.data]`` (seed 12345, file order), greedy, one sample each;
  ``val/reward_mean`` is the mean reward. A step's time includes the validation due after it,
  as the engine's ``timing/step_s`` does; time to target counts from the loop's start
  (building the model included; imports are not). A user's script pays its imports too, so
  the loop's ``start_s`` is measured in the same run (a fresh interpreter launched and importing
  what the loop imports: torch, transformers through ``nexrl_async.train.build``) and
  ``time_to_target_from_launch_s`` = ``start_s`` + its time to target is the figure that
  compares with the engine's (whose time to target already counts from its launch).

What differs: the engine is asynchronous (``batch-async``, max staleness 1: a batch may hold
samples of the previous policy, and its groups enter the batch in completion order, not source
order); its sampler is the inference server's, with its own RNG (the loop samples with a torch
generator seeded by ``--seed``), so the trajectories and curves are not bit-identical, only
statistically alike; the engine's trainer packs sequences (the loop pads to 7 tokens: the same
log-probs); the engine also checkpoints (every 100 steps), publishes weights to the server every
step and writes samples and events. ``--set`` overrides reach both runs (the loop reads the
recipe keys above from the overridden recipe).
"""

from __future__ import annotations

import argparse
import importlib.util
import inspect
import json
import math
import os
import random
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import tomllib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import msgspec
import torch
from torch import Tensor

from e2e_report import plot, print_summary
from harness import RESULTS_DIR, machine, write_json
from nexrl_async.train.build import BuiltModel, CharTokenizer, build_char_tokenizer, build_model_for
from nexrl_async.train.schedule import lr_multiplier

NAME = "e2e"
ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "reverse_digits" / "recipe.toml"
TARGET = 0.8
"""The ``val/reward_mean`` whose first crossing is timed."""
SKIP_STEPS = 2
"""Steps left out of the s/step median (start-up, first compilations)."""
GRPO_EPS = 1e-6
"""``algorithms.group_advantages``' default eps."""
CLIP = 0.2
"""``algorithm.clip_low`` / ``clip_high`` defaults (moot at ratio 1)."""
BETAS = (0.9, 0.999)
ADAM_EPS = 1e-8
"""``[optim]`` defaults the recipe does not set."""

# ---- the recipe -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Recipe:
    """What both runs need from the recipe TOML (engine defaults where it is silent)."""

    path: Path
    raw: dict[str, Any]

    @property
    def base_dir(self) -> Path:
        return self.path.parent

    def get(self, dotted: str, default: Any = None) -> Any:
        node: Any = self.raw
        for part in dotted.split("."):
            if not isinstance(node, dict) or part not in node:
                return default
            node = node[part]
        return node


def load_recipe(path: Path, overrides: Sequence[str] = ()) -> Recipe:
    """The recipe's TOML with ``--set KEY.PATH=VALUE`` overrides applied (values parsed as TOML
    literals, else bare strings, as ``config.loader`` does)."""
    raw = tomllib.loads(path.read_text(encoding="utf-8"))
    for item in overrides:
        key, _, text = item.partition("=")
        try:
            value = tomllib.loads(f"v = {text.strip()}")["v"]
        except tomllib.TOMLDecodeError:
            value = text.strip()
        node = raw
        *parents, leaf = key.strip().split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return Recipe(path=path.resolve(), raw=raw)


def load_callable(recipe: Recipe, ref: str) -> Any:
    """``"task.py:make_items"`` from the recipe's folder."""
    file_name, _, attr = ref.partition(":")
    path = recipe.base_dir / file_name
    name = f"e2e_task_{path.stem}"
    module = sys.modules.get(name)
    if module is None:
        spec = importlib.util.spec_from_file_location(name, path)
        assert spec is not None
        assert spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return getattr(module, attr)


def task_module(recipe: Recipe) -> ModuleType:
    factory = load_callable(recipe, recipe.get("data.factory"))
    return sys.modules[factory.__module__]


# ---- the hand-written loop ----------------------------------------------------------------------


@dataclass(frozen=True)
class LoopConfig:
    """Everything the loop uses; :func:`loop_config` fills it from the recipe."""

    model: dict[str, Any]
    tokenizer: dict[str, Any]
    train_items: Sequence[dict[str, Any]]
    """In the order the source hands them out."""
    val_items: Sequence[dict[str, Any]]
    score: Callable[[str, str], float]
    """``(answer, response) -> reward``; the response is decoded (special tokens skipped)."""
    steps: int
    seed: int = 0
    groups: int = 32
    group_size: int = 8
    max_new_tokens: int = 3
    temperature: float = 1.0
    val_temperature: float = 0.0
    val_every: int = 25
    lr: float = 1e-3
    weight_decay: float = 0.0
    max_grad_norm: float | None = 1.0
    entropy_coef: float = 0.01
    estimator: str = "grpo"
    """``algorithm.estimator``: ``grpo``, ``dr_grpo`` or ``rloo`` (token-mean loss only)."""
    schedule: str = "constant"
    warmup_steps: int = 0
    min_lr_ratio: float = 0.0
    filter_zero_variance: bool = False
    """Drop groups with equal rewards and sample more prompts until the batch is full."""
    prompt_field: str = "prompt"
    answer_field: str = "answer"
    threads: int = 1


def shuffled(rows: list[dict[str, Any]], *, shuffle: bool, seed: int) -> list[dict[str, Any]]:
    """Epoch 0 of ``data.source.RowSource``: ``random.Random(seed + 0)`` permutes the indices."""
    order = list(range(len(rows)))
    if shuffle:
        random.Random(seed).shuffle(order)
    return [rows[i] for i in order]


def loop_config(recipe: Recipe, *, steps: int, seed: int) -> LoopConfig:
    task = task_module(recipe)
    data_kwargs = recipe.get("data.kwargs", {})
    rows = list(load_callable(recipe, recipe.get("data.factory"))(**data_kwargs))
    shuffle, data_seed = recipe.get("data.shuffle", True), recipe.get("data.seed", 0)
    epochs = recipe.get("data.epochs", 1)
    train = [
        row for e in range(epochs) for row in shuffled(rows, shuffle=shuffle, seed=data_seed + e)
    ]
    val_data = recipe.get("validation.data")
    val_rows = list(load_callable(recipe, val_data["factory"])(**val_data.get("kwargs", {})))
    val = shuffled(val_rows, shuffle=val_data.get("shuffle", True), seed=val_data.get("seed", 0))
    if val_data.get("max_items") is not None:
        val = val[: val_data["max_items"]]
    grad_norm = recipe.get("optim.max_grad_norm", 1.0)
    reward = getattr(task, "reward", None) or task.positional_accuracy
    zero_var = recipe.get("pool.filter_zero_variance", False)
    zero_var = zero_var or recipe.get("algorithm.dynamic_sampling", False)
    return LoopConfig(
        model=recipe.get("model"),
        tokenizer=recipe.get("tokenizer"),
        train_items=train,
        val_items=val,
        score=lambda answer, response: float(reward(answer, response.strip())),
        steps=steps,
        seed=seed,
        groups=recipe.get("pool.batch_groups"),
        group_size=recipe.get("rollout.group_size"),
        max_new_tokens=recipe.get("rollout.max_new_tokens"),
        temperature=recipe.get("rollout.sampling.temperature", 1.0),
        val_temperature=recipe.get("validation.temperature", 0.0),
        val_every=recipe.get("validation.every_steps", 0),
        lr=recipe.get("optim.lr"),
        weight_decay=recipe.get("optim.weight_decay", 0.0),
        max_grad_norm=grad_norm,
        entropy_coef=recipe.get("algorithm.entropy_coef", 0.0),
        estimator=recipe.get("algorithm.estimator", "grpo"),
        schedule=recipe.get("optim.schedule", "constant"),
        warmup_steps=recipe.get("optim.warmup_steps", 0),
        min_lr_ratio=recipe.get("optim.min_lr_ratio", 0.0),
        filter_zero_variance=bool(zero_var),
        prompt_field=recipe.get("rollout.prompt_field", "prompt"),
        threads=recipe.get("trainer.threads", 1),
    )


def build_policy(cfg: LoopConfig) -> tuple[torch.nn.Module, Any]:
    """Tokenizer and model as ``train.model.load_policy`` builds them (seed ``cfg.seed``)."""
    tok = build_char_tokenizer(msgspec.convert(cfg.tokenizer, CharTokenizer))
    model = build_model_for(msgspec.convert(cfg.model, BuiltModel), tok, seed=cfg.seed)
    return model, tok


def grpo_advantages(
    rewards: Tensor, group_size: int, eps: float = GRPO_EPS, estimator: str = "grpo"
) -> Tensor:
    """``[B]`` (rows group-contiguous): ``(r - mean_g) / (std_g + eps)``, unbiased std (``grpo``;
    ``dr_grpo``: ``r - mean_g``; ``rloo``: ``n / (n - 1) (r - mean_g)``), exactly 0 for a group
    whose rewards are all equal; float64 inside, float32 out."""
    r = rewards.to(torch.float64).view(-1, group_size)
    mean = r.mean(dim=1, keepdim=True)
    std = r.std(dim=1, keepdim=True) if group_size > 1 else torch.zeros_like(mean)
    if estimator == "grpo":
        adv = (r - mean) / (std + eps)
    elif estimator == "dr_grpo":
        adv = r - mean
    elif estimator == "rloo":
        adv = (r - mean) * group_size / max(1, group_size - 1)
    else:
        raise ValueError(f"the loop has no estimator {estimator!r}")
    flat = (r.amax(dim=1, keepdim=True) == r.amin(dim=1, keepdim=True)).expand_as(r)
    return torch.where(flat, 0.0, adv).reshape(-1).to(torch.float32)


@torch.no_grad()
def generate(
    model: torch.nn.Module,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    temperature: float,
    eos_id: int,
    generator: torch.Generator,
) -> list[list[int]]:
    """Sampled (``temperature > 0``) or greedy responses, each cut after its first EOS.

    Prompts of one length decode together with a KV cache; the tokens a row draws after its
    EOS are dropped (causal attention: they never influence its earlier tokens).
    """
    out: list[list[int]] = [[] for _ in prompts]
    by_len: dict[int, list[int]] = {}
    for i, p in enumerate(prompts):
        by_len.setdefault(len(p), []).append(i)
    for rows in by_len.values():
        ids = torch.tensor([list(prompts[i]) for i in rows], dtype=torch.long)
        result = model(input_ids=ids, use_cache=True)
        cache_arg = _cache_kwarg(model)
        drawn = []
        done = torch.zeros(len(rows), dtype=torch.bool)
        for t in range(max_new_tokens):
            logits = result.logits[:, -1, :].float()
            if temperature > 0:
                probs = torch.softmax(logits / temperature, dim=-1)
                nxt = torch.multinomial(probs, 1, generator=generator).squeeze(1)
            else:
                nxt = logits.argmax(dim=-1)
            drawn.append(nxt)
            done |= nxt == eos_id
            if bool(done.all()) or t == max_new_tokens - 1:
                break
            cache = getattr(result, cache_arg)
            result = model(input_ids=nxt[:, None], use_cache=True, **{cache_arg: cache})
        tokens = torch.stack(drawn, dim=1).tolist()
        for i, row in zip(rows, tokens, strict=True):
            cut = row.index(eos_id) + 1 if eos_id in row else len(row)
            out[i] = row[:cut]
    return out


def _cache_kwarg(model: torch.nn.Module) -> str:
    """``cache`` (newer transformers) or ``past_key_values``: the forward's KV-cache argument,
    also the output's attribute."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def policy_loss(
    model: torch.nn.Module,
    prompts: Sequence[Sequence[int]],
    responses: Sequence[Sequence[int]],
    advantages: Tensor,
    *,
    pad_id: int,
    entropy_coef: float,
    temperature: float = 1.0,
) -> tuple[Tensor, dict[str, float]]:
    """Token-mean PPO-clip (ratio 1: the old log-probs are this forward's, detached) minus
    ``entropy_coef`` x the token-mean entropy, over the response tokens of the batch; logits
    divided by the sampling ``temperature``."""
    seqs = [list(p) + list(r) for p, r in zip(prompts, responses, strict=True)]
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    attn = torch.zeros((len(seqs), width), dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.float32)
    for row, (p, s) in enumerate(zip(prompts, seqs, strict=True)):
        ids[row, : len(s)] = torch.tensor(s)
        attn[row, : len(s)] = 1
        mask[row, len(p) : len(s)] = 1.0
    logits = model(input_ids=ids, attention_mask=attn, use_cache=False).logits[:, :-1].float()
    if temperature != 1.0:
        logits = logits / temperature
    logp = torch.log_softmax(logits, dim=-1)
    lp = logp.gather(-1, ids[:, 1:, None]).squeeze(-1)
    entropy = -(logp.exp() * logp).sum(-1)
    m = mask[:, 1:]
    denom = m.sum().clamp(min=1.0)
    ratio = torch.exp(lp - lp.detach())
    adv = advantages[:, None]
    pg = torch.maximum(-adv * ratio, -adv * ratio.clamp(1.0 - CLIP, 1.0 + CLIP))
    pg_loss = (pg * m).sum() / denom
    ent = (entropy * m).sum() / denom
    loss = pg_loss - entropy_coef * ent
    stats = {"pg_loss": float(pg_loss.detach()), "entropy": float(ent.detach())}
    return loss, {**stats, "tokens": float(denom)}


def encode(tok: Any, text: str) -> list[int]:
    return list(tok.encode(text, add_special_tokens=False))


def validate(model: torch.nn.Module, tok: Any, cfg: LoopConfig) -> dict[str, float]:
    prompts = [encode(tok, str(item[cfg.prompt_field])) for item in cfg.val_items]
    responses = generate(
        model,
        prompts,
        max_new_tokens=cfg.max_new_tokens,
        temperature=cfg.val_temperature,
        eos_id=tok.eos_token_id,
        generator=torch.Generator().manual_seed(0),
    )
    rewards, exact = [], []
    for item, resp in zip(cfg.val_items, responses, strict=True):
        answer = str(item[cfg.answer_field])
        text = tok.decode(resp, skip_special_tokens=True).strip()
        rewards.append(cfg.score(answer, text))
        exact.append(float(text[: len(answer)] == answer))
    return {"reward_mean": statistics.fmean(rewards), "exact_mean": statistics.fmean(exact)}


def run_loop(cfg: LoopConfig, *, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Train ``cfg.steps`` steps; per-step timings and rewards, and the validations with the
    wall seconds since the loop's start at which each finished."""
    threads_before = torch.get_num_threads()
    torch.set_num_threads(cfg.threads)
    try:
        return _run_loop(cfg, log)
    finally:
        torch.set_num_threads(threads_before)


def _run_loop(cfg: LoopConfig, log: Callable[[str], None]) -> dict[str, Any]:
    start, cpu_start, load_before = time.time(), time.process_time(), _load_avg()
    model, tok = build_policy(cfg)
    initial = {k: v.detach().clone() for k, v in model.state_dict().items()}
    optimizer = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad],
        lr=cfg.lr,
        betas=BETAS,
        eps=ADAM_EPS,
        weight_decay=cfg.weight_decay,
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda s: lr_multiplier(
            s,
            schedule=cfg.schedule,
            warmup_steps=cfg.warmup_steps,
            total_steps=cfg.steps,
            min_lr_ratio=cfg.min_lr_ratio,
        ),
    )
    generator = torch.Generator().manual_seed(cfg.seed)
    need = cfg.steps * cfg.groups
    if need > len(cfg.train_items):
        have = len(cfg.train_items)
        raise ValueError(f"{cfg.steps} steps need {need} items; the data has {have}")
    sampler = _GroupSampler(cfg, model, tok, generator)
    validations: list[dict[str, float]] = []

    def run_validation(step: int) -> None:
        metrics = validate(model, tok, cfg)
        validations.append({"step": step, "time_s": time.time() - start, **metrics})
        log(f"loop: validation at step {step}: val/reward_mean {metrics['reward_mean']:.4f}")

    run_validation(0)
    steps: list[dict[str, float]] = []
    for step in range(cfg.steps):
        t0 = time.perf_counter()
        sampled_before, flat_before = sampler.sampled, sampler.flat
        prompts, responses, rewards, exact = sampler.batch()
        t1 = time.perf_counter()
        advantages = grpo_advantages(rewards, cfg.group_size, estimator=cfg.estimator)
        loss, stats = policy_loss(
            model,
            prompts,
            responses,
            advantages,
            pad_id=tok.pad_token_id,
            entropy_coef=cfg.entropy_coef,
            temperature=cfg.temperature,
        )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        norm = (
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
            if cfg.max_grad_norm is not None
            else torch.tensor(math.nan)
        )
        optimizer.step()
        lr = optimizer.param_groups[0]["lr"]
        scheduler.step()
        t2 = time.perf_counter()
        done = step + 1
        if done == cfg.steps or (cfg.val_every > 0 and done % cfg.val_every == 0):
            run_validation(done)
        t3 = time.perf_counter()
        steps.append(
            {
                "step": step,
                "step_s": t3 - t0,
                "sample_s": t1 - t0,
                "update_s": t2 - t1,
                "validate_s": t3 - t2,
                "reward_mean": float(rewards.mean()),
                "exact_mean": float(exact.mean()),
                "groups_sampled": float(sampler.sampled - sampled_before),
                "zero_variance_frac": (sampler.flat - flat_before)
                / max(1, sampler.sampled - sampled_before),
                "lr": lr,
                "response_len_mean": statistics.fmean(len(r) for r in responses),
                "loss": float(loss.detach()),
                "grad_norm": float(norm),
                **stats,
            }
        )
    changed = max(
        float((model.state_dict()[k] - v).abs().max()) for k, v in initial.items() if v.numel()
    )
    return {
        "items_used": sampler.cursor,
        "steps": steps,
        "validations": validations,
        "wall_s": time.time() - start,
        "cpu_s": time.process_time() - cpu_start,
        "load_avg_1m": [load_before, _load_avg()],
        "params": sum(p.numel() for p in model.parameters()),
        "max_weight_change": changed,
        "initial_state": initial,
    }


class _GroupSampler:
    """Groups of ``group_size`` samples of the next prompts in source order; with
    ``filter_zero_variance`` flat groups are dropped and more are drawn (``groups`` prompts a
    draw) until a batch is full, the surplus kept for the next batch."""

    def __init__(self, cfg: LoopConfig, model: torch.nn.Module, tok: Any, generator: Any):
        self.cfg, self.model, self.tok, self.generator = cfg, model, tok, generator
        self.cursor = 0
        """Items handed out so far."""
        self.sampled = 0
        self.flat = 0
        """Groups sampled, and those of them with zero reward variance."""
        self._kept: list[tuple[list[list[int]], list[list[int]], list[float], list[float]]] = []

    def batch(self) -> tuple[list[list[int]], list[list[int]], Tensor, Tensor]:
        """Prompts and responses (rows group-contiguous), rewards and exact matches."""
        cfg = self.cfg
        while len(self._kept) < cfg.groups:
            if self.cursor >= len(cfg.train_items):
                raise ValueError(f"the data ({len(cfg.train_items)} items) is exhausted")
            items = cfg.train_items[self.cursor : self.cursor + cfg.groups]
            self.cursor += len(items)
            self._draw(items)
        groups, self._kept = self._kept[: cfg.groups], self._kept[cfg.groups :]
        prompts = [p for g in groups for p in g[0]]
        responses = [r for g in groups for r in g[1]]
        rewards = torch.tensor([x for g in groups for x in g[2]])
        exact = torch.tensor([x for g in groups for x in g[3]])
        return prompts, responses, rewards, exact

    def _draw(self, items: Sequence[dict[str, Any]]) -> None:
        cfg, tok, n = self.cfg, self.tok, self.cfg.group_size
        prompts = [encode(tok, str(item[cfg.prompt_field])) for item in items]
        prompts = [p for p in prompts for _ in range(n)]
        responses = generate(
            self.model,
            prompts,
            max_new_tokens=cfg.max_new_tokens,
            temperature=cfg.temperature,
            eos_id=tok.eos_token_id,
            generator=self.generator,
        )
        answers = [str(item[cfg.answer_field]) for item in items for _ in range(n)]
        texts = tok.batch_decode(responses, skip_special_tokens=True)
        rewards = [cfg.score(a, t) for a, t in zip(answers, texts, strict=True)]
        exact = [float(t.strip()[: len(a)] == a) for a, t in zip(answers, texts, strict=True)]
        for g in range(len(items)):
            rows = slice(g * n, (g + 1) * n)
            flat = max(rewards[rows]) == min(rewards[rows])
            self.sampled += 1
            self.flat += flat
            if not (flat and cfg.filter_zero_variance):
                self._kept.append((prompts[rows], responses[rows], rewards[rows], exact[rows]))


# ---- the engine run ----------------------------------------------------------------------------


def read_jsonl(path: Path, *, contains: Sequence[str] = ()) -> list[dict[str, Any]]:
    """The JSON objects of ``path``'s lines (only lines containing one of ``contains``, if
    given: cheap filtering of a large events file); a torn last line is skipped."""
    out = []
    with path.open(encoding="utf-8") as fh:
        for line in fh:
            if contains and not any(c in line for c in contains):
                continue
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return out


ENGINE_PARTS = (
    ("train_s", "train/step_s"),
    ("batch_wait_s", "pipeline/batch_wait_s"),
    ("gate_wait_sum_s", "pipeline/gate_wait_s"),  # summed over the rollout workers
    ("publish_s", "weights/publish_s"),
    ("pause_s", "weights/pause_s"),
)
"""Per-step figures of the engine's ``metrics.jsonl`` kept in the result: the wall parts of its
``timing/step_s`` and the rollout workers' summed wait at the staleness gate."""


def parse_engine_run(run_dir: Path, *, launch_time: float | None = None) -> dict[str, Any]:
    """Steps and validations of an engine run folder (see the module docstring for clocks).

    ``launch_time`` (``time.time()`` when the subprocess was started) is the origin of the
    validation times; without it, the ``run_started`` event (else the first metrics line).
    """
    records = read_jsonl(run_dir / "metrics.jsonl")
    steps = []
    for rec in records:
        if "timing/step_s" not in rec:
            continue
        row = {"step": int(rec["step"]), "step_s": float(rec["timing/step_s"])}
        row["reward_mean"] = float(rec.get("train/reward_mean", math.nan))
        for key, name in ENGINE_PARTS:
            row[key] = float(rec.get(name, math.nan))
        steps.append(row)
    events_path = run_dir / "events.jsonl"
    run_started = None
    raw_vals: list[tuple[int, float, dict[str, Any]]] = []
    if events_path.is_file():
        events = read_jsonl(events_path, contains=('"validated"', '"run_started"'))
        for ev in events:
            if ev.get("event") == "run_started" and run_started is None:
                run_started = float(ev["time"])
            elif ev.get("event") == "validated":
                raw_vals.append((int(ev["step"]), float(ev["time"]), ev.get("metrics", {})))
        source = "events.jsonl validated events (time.time() when each validation finished)"
    else:
        for rec in records:
            if "val/reward_mean" in rec:
                raw_vals.append((int(rec["step"]), float(rec["time"]), rec))
        source = "metrics.jsonl line times (written after the following step: an upper bound)"
    origin = launch_time
    if origin is None:
        origin = run_started if run_started is not None else float(records[0]["time"])
    validations = [
        {
            "step": step,
            "time_s": t - origin,
            "reward_mean": float(m.get("val/reward_mean", math.nan)),
            "exact_mean": float(m.get("val/exact_mean", math.nan)),
        }
        for step, t, m in raw_vals
    ]
    out: dict[str, Any] = {"steps": steps, "validations": validations, "timing_source": source}
    out["run_started_s"] = None if run_started is None else run_started - origin
    return out


def engine_argv(recipe: Path, out: Path, *, steps: int, seed: int | None, sets: Iterable[str]):
    argv = [sys.executable, "-m", "nexrl_async", "run", str(recipe), "--output", str(out)]
    argv += ["--set", f"run.total_steps={steps}"]
    if seed is not None:
        argv += ["--set", f"run.seed={seed}"]
    for item in sets:
        argv += ["--set", item]
    return argv


def run_engine(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    run_dir, log_path = work / "run", work / "engine.log"
    argv = engine_argv(args.recipe, run_dir, steps=args.steps, seed=args.seed, sets=args.set)
    print("engine:", " ".join(argv[1:]), flush=True)
    seen: set[int] = set()
    load_before = _load_avg()
    cpu_before = _children_cpu_s()
    with log_path.open("wb") as sink:
        launch = time.time()
        process = subprocess.Popen(argv, stdout=sink, stderr=subprocess.STDOUT, cwd=ROOT)
        try:
            while process.poll() is None:
                if time.time() - launch > args.engine_timeout:
                    raise TimeoutError(f"the engine run took over {args.engine_timeout} s")
                time.sleep(2.0)
                _echo_validations(run_dir / "metrics.jsonl", seen, launch)
        finally:
            if process.poll() is None:
                process.terminate()
                try:
                    process.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()
    wall = time.time() - launch
    if process.returncode != 0:
        tail = "\n".join(log_path.read_text(errors="replace").splitlines()[-30:])
        raise RuntimeError(f"the engine exited with {process.returncode}:\n{tail}")
    result = parse_engine_run(run_dir, launch_time=launch)
    result["wall_s"] = wall
    result["cpu_s"] = _children_cpu_s() - cpu_before
    result["load_avg_1m"] = [load_before, _load_avg()]
    result["argv"] = argv[1:]
    return result


LOOP_IMPORTS = "import msgspec, torch; import nexrl_async.train.build, nexrl_async.train.schedule"
"""What the loop needs before it starts (its module's imports but the benchmark's own)."""


def loop_start_s() -> float:
    """Wall seconds for a fresh interpreter to start and import what the loop imports."""
    launch = time.perf_counter()
    subprocess.run([sys.executable, "-c", LOOP_IMPORTS], cwd=ROOT, check=True)
    return time.perf_counter() - launch


def _children_cpu_s() -> float:
    """User + system CPU seconds of this process's finished children and their descendants
    (the engine reaps its server, so the server's CPU time is in the engine's total)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _load_avg() -> float:
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else math.nan


def _echo_validations(path: Path, seen: set[int], launch: float) -> None:
    if not path.is_file():
        return
    for rec in read_jsonl(path, contains=('"val/reward_mean"',)):
        if rec["step"] not in seen:
            seen.add(rec["step"])
            print(
                f"engine: val/reward_mean {rec['val/reward_mean']:.4f} (validation before step "
                f"{rec['step']}; line seen at {time.time() - launch:.0f} s)",
                flush=True,
            )


def initial_weights_gap(run_dir: Path, initial: dict[str, Tensor]) -> float | None:
    """Max |ours - engine's| over the weights in ``<run>/model`` (the initial HF folder)."""
    path = run_dir / "model" / "model.safetensors"
    if not path.is_file():
        return None
    from safetensors.torch import load_file

    theirs = load_file(str(path))
    common = [k for k in theirs if k in initial]
    if not common:
        return None
    return max(float((theirs[k].float() - initial[k].float()).abs().max()) for k in common)


# ---- summary ------------------------------------------------------------------------------------


def summarize(run: dict[str, Any], *, target: float = TARGET, skip: int = SKIP_STEPS) -> None:
    """Add ``s_per_step_median``, time/step to target and the final val to ``run`` (in place)."""
    timed = [s["step_s"] for s in run["steps"] if s["step"] >= skip]
    run["s_per_step_median"] = statistics.median(timed) if timed else math.nan
    vals = run["validations"]
    hit = next((v for v in vals if v["reward_mean"] >= target), None)
    run["time_to_target_s"] = hit["time_s"] if hit else math.nan
    run["target_step"] = hit["step"] if hit else None
    run["first_validation_s"] = vals[0]["time_s"] if vals else math.nan
    run["time_to_target_after_first_val_s"] = hit["time_s"] - vals[0]["time_s"] if hit else math.nan
    run["final_val_reward_mean"] = vals[-1]["reward_mean"] if vals else math.nan
    run["time_to_target_from_launch_s"] = run.get("start_s", 0.0) + run["time_to_target_s"]
    cpu, n = run.get("cpu_s"), len(run["steps"])
    run["cpu_s_per_step"] = cpu / n if cpu is not None and n else math.nan
    for key in ("sample_s", "update_s", *(k for k, _ in ENGINE_PARTS)):
        values = [s[key] for s in run["steps"] if s["step"] >= skip and key in s]
        values = [v for v in values if math.isfinite(v)]
        if values:
            run.setdefault("median_parts_s", {})[key] = statistics.median(values)


MEANS = (
    "s_per_step_median",
    "time_to_target_s",
    "time_to_target_from_launch_s",
    "time_to_target_after_first_val_s",
    "wall_s",
    "cpu_s_per_step",
)
"""The loop's figures averaged over its runs (and compared with the engine's)."""


def _loop_run(args: argparse.Namespace, recipe: Recipe, when: str) -> dict[str, Any]:
    cfg = loop_config(recipe, steps=args.steps, seed=args.seed)
    where = f" ({when})" if when else ""
    print(f"loop{where}: {args.steps} steps, {cfg.groups} x {cfg.group_size} samples", flush=True)
    start_s = loop_start_s()
    loop = run_loop(cfg)
    loop["start_s"] = start_s
    summarize(loop, target=args.target)
    return loop


def mean_loop(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The last run, with the :data:`MEANS` figures averaged over ``runs`` (NaN if any is)."""
    merged = {k: v for k, v in runs[-1].items() if k != "initial_state"}
    for key in MEANS:
        values = [run.get(key, math.nan) for run in runs]
        merged[key] = statistics.fmean(values) if all(map(math.isfinite, values)) else math.nan
    return merged


def ratios(engine: dict[str, Any], loop: dict[str, Any]) -> dict[str, float]:
    def ratio(key: str) -> float:
        a, b = engine.get(key, math.nan), loop.get(key, math.nan)
        return a / b if b and math.isfinite(a) and math.isfinite(b) else math.nan

    return {key: ratio(key) for key in MEANS}


# ---- main -------------------------------------------------------------------------------------


def git_state() -> dict[str, Any]:
    """The commit measured and whether ``src/`` had uncommitted changes (the engine's code)."""

    def git(*cmd: str) -> str:
        done = subprocess.run(["git", *cmd], cwd=ROOT, capture_output=True, text=True, check=False)
        return done.stdout.strip() if done.returncode == 0 else ""

    return {"commit": git("rev-parse", "HEAD"), "src_dirty": bool(git("status", "-s", "src"))}


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    add = parser.add_argument
    add("--recipe", type=Path, default=RECIPE, help="the recipe (its task.py beside it)")
    add("--steps", type=int, default=None, help="training steps (default: run.total_steps)")
    add("--seed", type=int, default=None, help="run.seed (default: the recipe's)")
    add("--skip-engine", action="store_true", help="run only the hand-written loop")
    add("--skip-loop", action="store_true", help="run only the engine")
    add("--set", action="append", default=[], metavar="KEY=VALUE", help="recipe override")
    add("--target", type=float, default=TARGET, help="val/reward_mean to time")
    add("--engine-timeout", type=float, default=3600.0, help="seconds before the engine is killed")
    add("--keep-run", action="store_true", help="keep the engine's run folder (printed)")
    add("--out-dir", type=Path, default=RESULTS_DIR, help="where JSON and PNG go")
    add("--loop-once", action="store_true", help="the loop after the engine only (no bracket)")
    args = parser.parse_args(argv)
    recipe = load_recipe(args.recipe, args.set)
    if args.steps is None:
        args.steps = int(recipe.get("run.total_steps"))
    if args.seed is None:
        args.seed = int(recipe.get("run.seed", 0))
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    recipe = load_recipe(args.recipe, args.set)
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    results: dict[str, Any] = {
        "benchmark": NAME, "machine": machine(), "settings": settings, "target": args.target,
        "skip_steps": SKIP_STEPS, "git": git_state(),
    }  # fmt: skip
    work = Path(tempfile.mkdtemp(prefix="e2e_engine_"))
    loops: list[dict[str, Any]] = []
    try:
        if not (args.skip_loop or args.skip_engine or args.loop_once):
            loops.append(_loop_run(args, recipe, "before the engine"))
        if not args.skip_engine:
            results["engine"] = run_engine(args, work)
            summarize(results["engine"], target=args.target)
        if not args.skip_loop:
            loops.append(_loop_run(args, recipe, "after the engine" if loops else ""))
            if "engine" in results:
                gap = initial_weights_gap(work / "run", loops[-1].pop("initial_state"))
                results["initial_weights_max_abs_diff"] = gap
            results["loop"] = mean_loop(loops)
            results["loop_runs"] = [{k: run.get(k) for k in MEANS} for run in loops]
    finally:
        if args.keep_run:
            print(f"engine run folder kept: {work / 'run'}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    if "engine" in results and "loop" in results:
        results["ratios_engine_over_loop"] = ratios(results["engine"], results["loop"])
    results["machine_after"] = machine()
    json_path = write_json(args.out_dir, NAME, results)
    png_path = plot(results, args.out_dir, NAME)
    print_summary(results)
    print(f"\nresults: {json_path}\nplot:    {png_path}")
    return results


if __name__ == "__main__":
    main()
