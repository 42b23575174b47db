"""Pipeline benchmark: the real engine, simulated inference and training, per staleness mode.

Run::

    python benchmarks/pipeline.py            # defaults (about 3 minutes)
    python benchmarks/pipeline.py --quick    # short smoke run
    python benchmarks/pipeline.py --train-s 2 --token-latency-s 0.02 --modes sync k1

Writes ``benchmarks/results/pipeline.json`` and ``benchmarks/results/pipeline.png``.

The engine is the one ``nexrl-async run`` uses (``run_recipe`` with a ``trainer_factory``). The
recipe extends ``recipes/reverse_digits/recipe.toml`` (written to a temp dir with a small task
file: random digit prompts, a random reward so that groups are never all equal), attaches to a
simulated SGLang server (``python -m nexrl_async.testing.simulated``, a fresh subprocess per
mode, per-token latency and log-normal output lengths from the options), and trains with
:class:`SimulatedTrainer`, whose ``step`` sleeps ``--train-s`` seconds. Validation, checkpoints
and the progress line are off. Modes: ``sync``, ``batch-async`` with k = 1 and k = 2,
``fully-async``; the same data order and server seed in each.

Measured from each run's ``metrics.jsonl``, skipping the first ``--warmup-steps`` steps:
step time (``timing/step_s``), steps/s and generated tokens/s, and where the time goes
(``pipeline/batch_wait_s``, ``weights/publish_s``, ``weights/pause_s`` = the drain or abort
hold of a publication, ``pipeline/gate_wait_s`` = rollout workers' time at the gate, summed
over workers). From ``events.jsonl``: each group's admitted → pooled time against its floor
(its longest sample x ``--token-latency-s``). CPU seconds of the engine and of the server.

Definitions (all from this run):

- ``T_train`` = ``--train-s``, the simulated train step. Without ``--train-s`` it is
  calibrated first: a short sync run (``--calibration-steps``, 0.05 s train step) measures
  T_gen the same way as below, and T_train is set to it, so that T_gen ~ T_train on whatever
  machine runs the benchmark.
- ``T_gen`` = mean ``pipeline/batch_wait_s`` of the ``sync`` run. In sync mode the gate admits
  the groups of batch s only once version s is published, and the trainer starts waiting for
  batch s right after that publication, so ``batch_wait_s`` is the wall time to generate one
  whole batch (``batch_groups`` groups x ``group_size`` samples, all in flight together), from
  admission to the last group pooled, with the fleet otherwise idle.
- ideal step time = ``max(T_gen, T_train)``: perfect overlap of generation and training.
- serial step time = ``T_gen + T_train``: what sync should show.
- efficiency = ideal step time / measured mean step time (= measured steps/s over ideal).

Acceptance: batch-async k = 1 efficiency >= 0.9 when T_gen ~ T_train; sync step ~ T_gen + T_train.
The simulated server has no capacity limit (N concurrent requests of L tokens take L x latency
together), so k = 2 and fully-async, which generate two batches at once, may beat the ideal.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import tomli_w

from harness import (
    RESULTS_DIR,
    free_port,
    machine,
    mean,
    server_process,
    simulated_server_argv,
    stdev,
    write_json,
)
from nexrl_async.config.loader import load_recipe
from nexrl_async.core.records import TrainBatch
from nexrl_async.obs.ledger import Admitted, Pooled, Trained, TurnGenerated, read_events
from nexrl_async.obs.metrics import read_metrics
from pipeline_report import plot, print_summary

NAME = "pipeline"
BASE_RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "reverse_digits" / "recipe.toml"
ALPHABET = "0123456789"
EFFICIENCY_TARGET = 0.9

TASK_CODE = '''"""Benchmark task: random digit prompts, a random reward (the tokens are random)."""

from __future__ import annotations

import random
from collections.abc import Iterator

from nexrl_async.core.records import DataItem, EvalResult, Trajectory


def make_items(count: int = 1024, digits: int = 16, seed: int = 0) -> Iterator[dict[str, str]]:
    rng = random.Random(seed)
    for _ in range(count):
        yield {"prompt": "".join(rng.choice("0123456789") for _ in range(digits))}


class RandomEvaluator:
    def __init__(self) -> None:
        self._rng = random.Random(0)

    def evaluate(self, item: DataItem, trajectory: Trajectory) -> EvalResult:
        return EvalResult(reward=self._rng.random())
'''


@dataclass(frozen=True)
class Mode:
    """One engine configuration to measure."""

    key: str
    label: str
    staleness: str
    k: int | None


MODES = {
    "sync": Mode("sync", "sync", "sync", 0),
    "k1": Mode("k1", "batch-async k=1", "batch-async", 1),
    "k2": Mode("k2", "batch-async k=2", "batch-async", 2),
    "fully": Mode("fully", "fully-async", "fully-async", None),
}


class SimulatedTrainer:
    """A :class:`~nexrl_async.core.protocols.PolicyTrainer` whose step sleeps ``train_s``
    seconds (run in the engine's worker thread, like a real step). It has no weights:
    ``save_hf`` writes a tiny placeholder folder (the simulated server accepts any path in
    ``update_weights_from_disk``), checkpoints hold only its step count, and log-probs, the
    validation loss and parameter streams are empty."""

    context_length = None

    def __init__(self, *, train_s: float, tokenizer: Any, seed: int = 0) -> None:
        self.train_s = train_s
        self.tokenizer = tokenizer
        self.steps_done = 0
        self._rng = random.Random(seed)

    def step(self, batch: TrainBatch) -> dict[str, float]:
        start = time.perf_counter()
        time.sleep(self.train_s)
        self.steps_done += 1
        samples = batch.trajectories
        return {
            "train/loss": self._rng.gauss(0.0, 1.0),
            "train/samples": float(len(samples)),
            "train/tokens": float(sum(t.num_generated for t in samples)),
            "train/step_s": time.perf_counter() - start,
        }

    def compute_logprobs(self, batch: TrainBatch) -> list[list[float]]:
        return [[0.0] * t.num_tokens for t in batch.trajectories]

    def validation_loss(self, batch: TrainBatch) -> dict[str, float]:
        return {}

    def save_hf(self, path: str | Path) -> Path:
        out = Path(path)
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(
            f'{{"simulated": true, "steps": {self.steps_done}}}\n', encoding="utf-8"
        )
        return out

    def named_parameters_for_sync(self) -> Iterator[tuple[str, Any]]:
        return iter(())

    def save_checkpoint(self, directory: str | Path) -> Path:
        out = Path(directory)
        (out / "simulated_trainer.json").write_text(json.dumps({"steps": self.steps_done}))
        return out

    def load_checkpoint(self, directory: str | Path) -> None:
        state = json.loads((Path(directory) / "simulated_trainer.json").read_text())
        self.steps_done = int(state["steps"])

    def shutdown(self) -> None:
        pass


def char_tokenizer() -> Any:
    """The char tokenizer the recipe's built model would use (its vocab sizes the server)."""
    from nexrl_async.config.model import CharTokenizer
    from nexrl_async.train.build import build_char_tokenizer

    return build_char_tokenizer(CharTokenizer(alphabet=ALPHABET))


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add = parser.add_argument
    add("--quick", action="store_true", help="few, small steps (smoke run)")
    add("--out-dir", type=Path, default=RESULTS_DIR, help="where JSON and PNG go")
    add("--modes", nargs="+", choices=list(MODES), default=list(MODES))
    add("--steps", type=int, default=12, help="training steps per mode")
    add("--warmup-steps", type=int, default=2, help="first steps left out of the figures")
    add("--train-s", type=float, default=None, help="T_train (default: calibrated to T_gen)")
    add("--calibration-steps", type=int, default=6, help="steps of the calibration run")
    add("--token-latency-s", type=float, default=0.01, help="simulated seconds per token")
    add("--prefill-latency-s", type=float, default=0.0, help="simulated first-token delay")
    add("--mean-output-tokens", type=float, default=40.0, help="median output length")
    add("--output-tokens-sigma", type=float, default=0.5, help="log-normal sigma of lengths")
    add("--max-new-tokens", type=int, default=128)
    add("--batch-groups", type=int, default=8)
    add("--group-size", type=int, default=8)
    add("--workers", type=int, default=None, help="rollout workers (default 3 x batch)")
    add("--prompt-digits", type=int, default=16)
    add("--inflight", choices=["drain", "interrupt"], default="drain", help="weights.inflight")
    add("--seed", type=int, default=0)
    add("--work-dir", type=Path, default=None, help="keep the run folders here (default: temp)")
    args = parser.parse_args(argv)
    if args.quick:
        args.steps, args.warmup_steps, args.batch_groups, args.group_size = 5, 2, 4, 4
        args.mean_output_tokens, args.calibration_steps = 20.0, 3
    args.workers = args.workers or 3 * args.batch_groups
    return args


def write_recipe(work: Path, mode: Mode, url: str, args: argparse.Namespace) -> Path:
    """The mode's recipe (extending reverse_digits) and the task file, in ``work``."""
    work.mkdir(parents=True, exist_ok=True)
    (work / "bench_task.py").write_text(TASK_CODE, encoding="utf-8")
    count = args.steps * args.batch_groups * 4 + 64
    recipe: dict[str, Any] = {
        "extends": str(BASE_RECIPE),
        "run": {"name": f"bench-{mode.key}", "total_steps": args.steps, "seed": args.seed},
        "data": {
            "kind": "python", "factory": "bench_task.py:make_items", "required": ["prompt"],
            "kwargs": {"count": count, "digits": args.prompt_digits, "seed": args.seed},
        },
        "rollout": {
            "evaluator": "bench_task.py:RandomEvaluator", "workers": args.workers,
            "group_size": args.group_size, "max_new_tokens": args.max_new_tokens,
            "apply_chat_template": False,
        },
        "pool": {"batch_groups": args.batch_groups},
        "staleness": {"mode": mode.staleness, "max_staleness": 1 if mode.k is None else mode.k},
        "inference": {
            "backend": "attach", "urls": [url], "max_concurrency_per_server": 4096,
        },
        "weights": {"inflight": args.inflight},
        "validation": {"every_steps": 0, "before_training": False, "at_end": False},
        "checkpoint": {"every_steps": 0, "at_end": False, "export_hf": False, "on_sigterm": False},
        "logging": {"progress": False, "samples_every_steps": 0, "level": "WARNING"},
    }  # fmt: skip
    path = work / "recipe.toml"
    path.write_text(tomli_w.dumps(recipe), encoding="utf-8")
    return path


def calibrate(args: argparse.Namespace, work: Path, tokenizer: Any) -> float:
    """T_gen from a short sync run with a near-zero train step: mean batch wait after the
    first step. Used as T_train when ``--train-s`` is not given, so that T_gen ~ T_train on
    whatever machine runs the benchmark."""
    short = argparse.Namespace(**{**vars(args), "steps": args.calibration_steps, "train_s": 0.05})
    records, _, _ = run_mode(MODES["sync"], short, work, tokenizer, name="calibration")
    t_gen: float = summarise_mode(records, warmup=1)["batch_wait_s"]
    return round(t_gen, 2)


def run_mode(
    mode: Mode, args: argparse.Namespace, work: Path, tokenizer: Any, *, name: str | None = None
) -> tuple[list[dict[str, Any]], Path, dict[str, float]]:
    """One engine run of ``mode`` against a fresh simulated server; its metric records."""
    port = free_port()
    argv = simulated_server_argv(
        port, token_latency_s=args.token_latency_s, prefill_latency_s=args.prefill_latency_s,
        mean_output_tokens=args.mean_output_tokens,
        output_tokens_sigma=args.output_tokens_sigma, vocab_size=len(tokenizer),
        eos_token_id=tokenizer.eos_token_id, seed=args.seed, weight_version=0,
    )  # fmt: skip

    def factory(spec: object) -> SimulatedTrainer:
        return SimulatedTrainer(train_s=args.train_s, tokenizer=tokenizer, seed=args.seed)

    from nexrl_async.engine.run import run_recipe  # imports torch: only once a run starts

    mode_dir = work / (name or mode.key)
    with server_process(argv, port=port, log_path=mode_dir / "simulated.log") as server:
        recipe = load_recipe(write_recipe(mode_dir, mode, server.url, args))
        server_cpu = psutil.Process(server.process.pid)
        cpu0, server0 = time.process_time(), sum(server_cpu.cpu_times()[:2])
        started = time.perf_counter()
        reason = run_recipe(recipe, output=mode_dir / "run", trainer_factory=factory)
        usage = {
            "run_wall_s": time.perf_counter() - started,
            "engine_cpu_s": time.process_time() - cpu0,
            "server_cpu_s": sum(server_cpu.cpu_times()[:2]) - server0,
        }
    if reason != "completed":
        raise RuntimeError(f"{mode.label}: run ended with {reason!r}")
    records = [r for r in read_metrics(mode_dir / "run" / "metrics.jsonl") if "timing/step_s" in r]
    print(
        f"  {name or mode.label:16s} {len(records)} steps in {usage['run_wall_s']:.1f} s "
        f"(CPU s: engine {usage['engine_cpu_s']:.1f}, server {usage['server_cpu_s']:.1f})",
        flush=True,
    )
    return records, mode_dir / "run" / "events.jsonl", usage


def summarise_mode(records: Sequence[Mapping[str, Any]], warmup: int) -> dict[str, Any]:
    """Means over the steps after ``warmup`` (step time, throughput, where the time goes)."""
    kept = [r for r in records if r["step"] >= warmup]
    if not kept:
        raise ValueError(f"no steps after the {warmup} warm-up steps")
    steps = [float(r["timing/step_s"]) for r in kept]
    tokens = sum(float(r["throughput/tokens_per_s"]) * float(r["timing/step_s"]) for r in kept)

    def avg(key: str) -> float:
        return mean([float(r[key]) for r in kept if r.get(key) is not None])

    wait, publish = avg("pipeline/batch_wait_s"), avg("weights/publish_s")
    return {
        "steps_measured": len(kept),
        "step_s": mean(steps),
        "step_s_std": stdev(steps),
        "step_s_median": statistics.median(steps),
        "steps_per_s": len(kept) / sum(steps),
        "tokens_per_s": tokens / sum(steps),
        "batch_wait_s": wait,
        "publish_s": publish,
        "pause_s": avg("weights/pause_s"),
        "gate_wait_s": avg("pipeline/gate_wait_s"),
        "train_and_rest_s": mean(steps) - wait - publish,
        "staleness_mean": avg("pipeline/staleness_mean"),
        "response_len_mean": avg("rollout/response_len_mean"),
        "per_step": [{k: r.get(k) for k in _PER_STEP_KEYS} for r in records],
    }


_PER_STEP_KEYS = (
    "step", "timing/step_s", "pipeline/batch_wait_s", "weights/publish_s", "weights/pause_s",
    "pipeline/gate_wait_s", "throughput/tokens_per_s", "pipeline/staleness_mean",
)  # fmt: skip


def group_latency(events_path: Path, warmup: int, token_latency_s: float) -> dict[str, float]:
    """Per group of the measured steps: admitted → pooled wall time, and its floor (the
    group's longest sample × token latency): how much the engine and server add."""
    admitted: dict[str, float] = {}
    pooled: dict[str, float] = {}
    longest: dict[str, int] = {}
    measured: set[str] = set()
    for event in read_events(events_path):
        if isinstance(event, Admitted):
            admitted[event.group_id] = event.time
        elif isinstance(event, Pooled):
            pooled[event.group_id] = event.time
        elif isinstance(event, TurnGenerated):
            longest[event.group_id] = max(longest.get(event.group_id, 0), event.n_tokens)
        elif isinstance(event, Trained) and event.step >= warmup:
            measured.update(event.group_ids)
    spans = [pooled[g] - admitted[g] for g in measured if g in pooled and g in admitted]
    floors = [longest[g] * token_latency_s for g in measured if g in longest]
    return {"group_latency_s": mean(spans), "group_floor_s": mean(floors)}


def analyse(modes: dict[str, dict[str, Any]], train_s: float) -> dict[str, Any]:
    """T_gen (from sync), the ideal and serial step times, efficiency per mode, acceptance."""
    t_gen = modes["sync"]["batch_wait_s"] if "sync" in modes else float("nan")
    ideal, serial = max(t_gen, train_s), t_gen + train_s
    for summary in modes.values():
        summary["efficiency"] = ideal / summary["step_s"]
        summary["efficiency_of_median_step"] = ideal / summary["step_s_median"]
    acceptance: dict[str, Any] = {}
    if "k1" in modes:
        eff = modes["k1"]["efficiency"]
        acceptance["batch_async_k1_efficiency"] = eff
        acceptance["batch_async_k1_passed"] = eff >= EFFICIENCY_TARGET
    if "sync" in modes:
        acceptance["sync_step_over_serial"] = modes["sync"]["step_s"] / serial
    return {
        "t_gen_s": t_gen,
        "t_train_s": train_s,
        "t_gen_over_t_train": t_gen / train_s,
        "ideal_step_s": ideal,
        "serial_step_s": serial,
        "efficiency_target": EFFICIENCY_TARGET,
        **acceptance,
    }


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    tokenizer = char_tokenizer()
    keys = [k for k in MODES if k in args.modes]  # sync first: it defines T_gen
    print(f"pipeline benchmark: modes {keys}, {args.steps} steps each", flush=True)
    modes: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="bench-pipeline-") as tmp:
        work = args.work_dir or Path(tmp)
        calibrated = args.train_s is None
        if calibrated:
            args.train_s = calibrate(args, work, tokenizer)
            print(f"  calibrated T_train = {args.train_s:.2f} s", flush=True)
        for key in keys:
            records, events, usage = run_mode(MODES[key], args, work, tokenizer)
            summary = {**summarise_mode(records, args.warmup_steps), **usage}
            summary.update(group_latency(events, args.warmup_steps, args.token_latency_s))
            modes[key] = {"label": MODES[key].label, **summary}
    settings = {k: v for k, v in vars(args).items() if k not in ("out_dir", "quick", "work_dir")}
    settings["train_s_calibrated"] = calibrated
    results = {
        "benchmark": NAME, "machine": machine(), "settings": settings,
        "analysis": analyse(modes, args.train_s), "modes": modes,
    }  # fmt: skip
    json_path = write_json(args.out_dir, NAME, results)
    png_path = plot(results, args.out_dir, NAME)
    print_summary(results)
    print(f"results: {json_path}\nplot:    {png_path}")
    return results


if __name__ == "__main__":
    main()
