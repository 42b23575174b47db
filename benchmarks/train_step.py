"""Train-step benchmark: our step against a plain padded torch step on the same rows, packing's
padding, and the seconds one weight publication takes by ``disk`` and by ``distributed``.

Run::

    python benchmarks/train_step.py            # full (2-3 minutes on 2 busy cores)
    python benchmarks/train_step.py --quick    # tiny sizes (smoke run)
    python benchmarks/train_step.py --parts step --shapes demo --steps 15 --profile

Writes ``benchmarks/results/train_step.json`` and ``benchmarks/results/train_step.png``
(``--profile``: also ``train_step_profile.txt``). Every ratio is taken within one run.

(1) ``step``: seconds of ``train.Trainer.step`` (RL, old log-probs recomputed, SDPA, the
trainer's micro-batch plan) per shape of rows (``--shapes``, see ``train_step_baseline.py``:
``demo`` is the reverse-digits recipe's model, config and ~1,700-token batches; ``long-tail``
synthetic long-tailed rows), against the BASELINE: the plain padded torch step a hand-written
loop takes (every row padded to the batch's longest, one forward and backward with the same
loss, clip, AdamW; :class:`~train_step_baseline.PaddedStep`). Also measured: ours with
``trainer.packing = false``, and ours with every micro-batch packed (``always packed``: the
step before plans had a cost model, one dense ``[N, N]`` mask per micro-batch under SDPA). Each
runner has its own model of the same config and seed. First the baseline's log-probs are
checked against ``Trainer.compute_logprobs`` (same weights; max difference reported). Then
``--warmup`` untimed and ``--steps`` timed rounds, each running every runner once in a
rotating order. The machine is shared, so a step is timed by this process's CPU time (torch on
``--threads`` 1: CPU time is the work done) and by wall time; medians are compared, and the
median of each round's ours / baseline too. Target: ours <= 1.2 x the baseline's seconds.

(2) ``padding`` (``train_step_padding.py``): the share of token slots each plan leaves empty.

(3) ``publish`` (``train_step_publish.py``): wall seconds of ``weights.Publisher.publish`` for
a ~100M-parameter Qwen2 into one local server, by ``disk`` and by ``distributed`` at each
``--bucket-mb``. With ``--quick`` the server starts before part (1), so its start-up overlaps.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import torch

from harness import RESULTS_DIR, machine, write_json
from nexrl_async.train import packing_plan as plans
from nexrl_async.train.microbatch import plan_layout
from nexrl_async.train.packing import plan_costs
from nexrl_async.train.tensors import sequences_from_batch
from train_step_baseline import (
    PaddedStep,
    Shape,
    always_packed,
    demo_shape,
    logprob_gap,
    long_tail_shape,
)
from train_step_padding import measure_padding
from train_step_publish import measure_publish, publication_setup
from train_step_report import plot, print_summary

NAME = "train_step"
STEP_TARGET = 1.2
"""Ours may take at most this many times the plain padded step's seconds."""
SHAPES: dict[str, Callable[[argparse.Namespace], Shape]] = {
    "demo": demo_shape,
    "long-tail": long_tail_shape,
}
PHASES = (
    ("batch to tensors", "tensors.py", "sequences_from_batch"),
    ("pre-pass (no-grad log-probs + entropy)", "trainer.py", "_pre_pass"),
    ("targets (advantages)", "targets.py", "build_targets"),
    ("forward + loss", "loss.py", "__call__"),
    ("forward + loss", "train_step_baseline.py", "loss"),
    ("backward", "~", "run_backward"),
    ("clip grad norm", "clip_grad.py", "clip_grad_norm_"),
    ("AdamW", "adam.py", "step"),
    ("AdamW", "adamw.py", "step"),
)
"""``(label, file suffix, function)`` whose cumulative CPU time ``--profile`` reports."""

# ---- (1) train step -------------------------------------------------------------------------


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
        print(f"  {label} round {i + 1}/{warmup + steps}: " + ", ".join(
            f"{n} {1000 * t['cpu_s'][-1]:.0f} ms" for n, t in times.items() if i >= warmup
        ), flush=True)  # fmt: skip
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


def slowdowns(runs: dict[str, Any], baseline: str = "baseline") -> dict[str, dict[str, float]]:
    """Per runner: its median seconds / the baseline's, by CPU and wall time, and the median
    of the rounds' own CPU ratios (``paired_cpu``: each round's load hits both alike)."""
    base = runs[baseline]
    out = {}
    for name, run in runs.items():
        pairs = [a / b for a, b in zip(run["cpu_s"], base["cpu_s"], strict=True)]
        out[name] = {
            "cpu": run["median_cpu_s"] / base["median_cpu_s"],
            "wall": run["median_wall_s"] / base["median_wall_s"],
            "paired_cpu": statistics.median(pairs),
        }
    return out


def _layout(shape: Shape, model: Any) -> dict[str, Any]:
    """The plan our step runs on the shape's rows: layout, micro-batches, padding."""
    seq = sequences_from_batch(shape.batch, pad_token_id=0)
    budget = shape.trainer.micro_batch_tokens
    packed, plan = plan_layout(seq.lengths, range(seq.size), budget, costs=plan_costs(model))
    lengths = [int(n) for n in seq.lengths]
    return {
        "layout": "packed" if packed else "padded", "micro_batches": len(plan),
        "micro_batch_tokens": budget,
        "padding_frac": plans.padding_fraction(lengths, plan, packed=packed, budget=budget),
    }  # fmt: skip


def shape_setup(shape: Shape) -> tuple[dict[str, Callable[[], object]], dict[str, Any]]:
    """The runners of one shape and what describes it (model, batch, plan, log-prob gap)."""
    ours, off, dense = (shape.new_trainer(packing=p) for p in (True, False, True))
    seq = sequences_from_batch(shape.batch, pad_token_id=0)
    base = PaddedStep(shape.new_model(), seq, shape)

    def always_packed_step() -> None:
        with always_packed():
            dense.step(shape.batch)

    runners: dict[str, Callable[[], object]] = {
        "ours": lambda: ours.step(shape.batch),
        "ours, packing off": lambda: off.step(shape.batch),
        "ours, always packed": always_packed_step,
        "baseline": base.step,
    }
    lengths = [int(n) for n in seq.lengths]
    info = {
        "model": {"architecture": shape.model.architecture, "dtype": "float32",
                  "params": sum(p.numel() for p in ours.model.parameters()),
                  "hidden": shape.model.hidden_size, "layers": shape.model.num_hidden_layers,
                  "vocab": shape.vocab, "attention": shape.model.attn_implementation},
        "batch": {"rows": seq.size, "tokens": sum(lengths), "max_len": max(lengths),
                  "median_len": statistics.median(lengths), "padded_slots": seq.size * seq.width},
        "plan": _layout(shape, ours.model),
        "logprob_max_abs_diff": logprob_gap(ours, base, shape.batch),
    }  # fmt: skip
    return runners, info


def measure_shape(shape: Shape, args: argparse.Namespace) -> dict[str, Any]:
    runners, info = shape_setup(shape)
    batch, plan = info["batch"], info["plan"]
    gap = info["logprob_max_abs_diff"]
    print(f"step, {shape.name}: {info['model']['params'] / 1e6:.2f}M params, {batch['rows']} rows, "
          f"{batch['tokens']} tokens, ours: {plan['micro_batches']} {plan['layout']} "
          f"micro-batch(es), log-prob gap {gap:.1e}", flush=True)  # fmt: skip
    runs = summarise_runs(timed_rounds(runners, args.warmup, args.steps), batch["tokens"])
    ratios = slowdowns(runs)
    slowdown = ratios["ours"]["cpu"]
    return {
        **info, "torch_threads": torch.get_num_threads(), "runs": runs, "slowdowns": ratios,
        "slowdown_vs_baseline": slowdown, "passed": slowdown <= STEP_TARGET,
        "phases_cpu_s": profile_steps(runners, args.out_dir, shape.name) if args.profile else None,
    }  # fmt: skip


def measure_step(args: argparse.Namespace) -> dict[str, Any]:
    shapes = {name: measure_shape(SHAPES[name](args), args) for name in args.shapes}
    return {
        "target": STEP_TARGET, "shapes": shapes,
        "passed": all(s["passed"] for s in shapes.values()),
    }  # fmt: skip


def profile_steps(
    runners: dict[str, Callable[[], object]], out_dir: Path, label: str
) -> dict[str, Any]:
    """One step of each runner under cProfile on CPU time (the :data:`PHASES`' cumulative
    seconds are returned) and one under torch.profiler (top ops by self CPU time); both
    written to ``<out_dir>/train_step_profile_<label>.txt``."""
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
            for phase, suffix, wanted in PHASES:
                if path.endswith(suffix) and wanted in func:
                    found[phase] = found.get(phase, 0.0) + row[3]
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            run()
        ops = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25)
        texts.append(
            f"==== {name}: cProfile (CPU s) ====\n{text.getvalue()}\n"
            f"==== {name}: torch ops ====\n{ops}"
        )
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{NAME}_profile_{label}.txt"
    path.write_text("\n\n".join(texts), encoding="utf-8")
    return phases


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
    step("--shapes", nargs="+", choices=list(SHAPES), default=list(SHAPES), help="rows to train")
    step("--steps", type=int, default=9, help="timed rounds")
    step("--warmup", type=int, default=2, help="untimed rounds first")
    long_tail = parser.add_argument_group("(1) the long-tail shape").add_argument
    long_tail("--groups", type=int, default=4)
    long_tail("--group-size", type=int, default=8)
    long_tail("--median-len", type=int, default=40, help="median response tokens")
    long_tail("--sigma", type=float, default=0.9, help="log-normal sigma of response lengths")
    long_tail("--max-len", type=int, default=512, help="longest response (max_new_tokens)")
    long_tail("--hidden", type=int, default=128)
    long_tail("--intermediate", type=int, default=512)
    long_tail("--layers", type=int, default=4)
    long_tail("--heads", type=int, default=4)
    long_tail("--vocab", type=int, default=2048)
    long_tail("--micro-batch-tokens", type=int, default=1024, help="trainer.micro_batch_tokens")
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
