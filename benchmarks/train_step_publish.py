"""Weight publication by ``disk`` and ``distributed`` into one local server.

Part (3) of the train-step benchmark (``train_step.py``): a Qwen2 of ~100M parameters
(``--publish-*``) is built, saved, and served by one local server
(``python -m nexrl_async serve --model DIR --port N --torch-threads 1``, a subprocess). One
:class:`weights.Publisher` per transport publishes the trainer's weights into it through an
attached fleet (``inference.fleet.open_fleet``): ``disk`` (``Trainer.save_hf`` to safetensors,
then ``/update_weights_from_disk``) and ``distributed_<n>mb`` per ``--bucket-mb`` (gloo broadcast
by ``weights.sender.WeightSender`` in buckets of ``n`` MiB, ``/update_weights_from_distributed``,
each transport its own group). Rounds publish once by each, in turn. Every publication is timed
end to end by the publisher (:class:`weights.PublishStats`: prepare, hold, transfer, verify
``weight_version``, flush); the first by each (distributed: it opens the group) is reported
apart from the median of the rest. Wall time: two processes share the machine.

Standalone (``python benchmarks/train_step_publish.py``): the demo's shape
(``recipes/reverse_digits``: hidden 64, 2 layers) under the demo's load. ``--load`` client
tasks keep short requests (a 5-token prompt, 3 new tokens) running through the fleet's leases,
as rollout workers do, while one publisher per ``transport:inflight`` mode (``--modes``)
publishes in turn, in a rotating order, ``--rounds`` times. Reported per mode: the median
``publish_s`` (what the engine logs as ``weights/publish_s``) and ``pause_s`` over the rounds
after the first, and the ratio to ``disk:drain`` (the old default) in the same run. Writes
``<out-dir>/publish.json``.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import httpx

from harness import RESULTS_DIR, free_port, machine, stop_process, table, write_json
from nexrl_async.config.inference import AttachInference, WeightsConfig
from nexrl_async.config.model import BuiltModel, CharTokenizer
from nexrl_async.config.training import AlgorithmConfig, OptimConfig, TrainerConfig
from nexrl_async.inference.client.sglang import SGLangClient
from nexrl_async.inference.fleet.supervisor import Fleet, open_fleet
from nexrl_async.train.build import build_char_tokenizer, build_model, save_model_dir
from nexrl_async.train.trainer import Trainer
from nexrl_async.weights import (
    DiskTransport,
    DistributedTransport,
    Publisher,
    PublishStats,
    Transport,
)
from nexrl_async.weights.sender import WeightSender


@dataclass
class PublishSetup:
    """The publishing trainer (its model saved in ``work``) and the server started on it."""

    trainer: Trainer
    work: Path
    process: subprocess.Popen[bytes]
    url: str
    argv: list[str]
    started: float

    def wait_ready(self, timeout_s: float = 600.0) -> float:
        """Wait for ``GET /health`` = 200; returns the seconds since the server was started."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                log = (self.work / "server.log").read_text(errors="replace")[-3000:]
                raise RuntimeError(f"server exited with {self.process.returncode}:\n{log}")
            try:
                if httpx.get(f"{self.url}/health", timeout=2.0).status_code == 200:
                    return time.perf_counter() - self.started
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        raise TimeoutError(f"{self.url} not healthy after {timeout_s} s")


@contextmanager
def publication_setup(args: argparse.Namespace) -> Iterator[PublishSetup]:
    """Build and save the publication model, start a server on it (not waiting for it), and
    stop the server by its handle on exit."""
    tokenizer = build_char_tokenizer(CharTokenizer())
    cfg = BuiltModel(
        hidden_size=args.publish_hidden,
        intermediate_size=args.publish_intermediate,
        num_hidden_layers=args.publish_layers,
        num_attention_heads=args.publish_heads,
        dtype=args.publish_dtype,
    )
    model = build_model(
        cfg, vocab_size=args.publish_vocab, seed=0, pad_token_id=0, bos_token_id=1, eos_token_id=2
    )
    trainer = Trainer(
        model,
        tokenizer,
        algorithm=AlgorithmConfig(),
        optim=OptimConfig(),
        trainer=TrainerConfig(device="cpu"),
        max_new_tokens=16,
    )
    with tempfile.TemporaryDirectory(prefix="bench-train-step-") as tmp:
        work = Path(tmp)
        model_dir = save_model_dir(model, tokenizer, work / "model")
        port = free_port()
        argv = [
            sys.executable,
            "-m",
            "nexrl_async",
            "serve",
            "--model",
            str(model_dir),
            "--port",
            str(port),
            "--torch-threads",
            "1",
        ]
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        with (work / "server.log").open("wb") as sink:
            process = subprocess.Popen(argv, stdout=sink, stderr=subprocess.STDOUT, env=env)
        try:
            yield PublishSetup(
                trainer, work, process, f"http://127.0.0.1:{port}", argv, time.perf_counter()
            )
        finally:
            stop_process(process)


def transports(
    setup: PublishSetup, clients: dict[str, SGLangClient], args: argparse.Namespace
) -> dict[str, tuple[WeightsConfig, Transport]]:
    """``disk``, then ``distributed_<n>mb`` per ``--bucket-mb`` (each its own group)."""
    common: dict[str, Any] = {"step_timeout_s": 600.0, "retries": 0}
    disk_cfg = WeightsConfig(transport="disk", keep_versions=1, **common)
    export = setup.trainer.save_hf
    out: dict[str, tuple[WeightsConfig, Transport]] = {
        "disk": (disk_cfg, DiskTransport(disk_cfg, clients=clients,
                                         weights_dir=setup.work / "weights", export=export)),
    }  # fmt: skip
    for mb in args.bucket_mb:
        cfg = WeightsConfig(transport="distributed", bucket_mb=mb, **common)
        transport = DistributedTransport(
            cfg, clients=clients, sender_factory=WeightSender, group_name=f"bench_{mb}mb",
            params=setup.trainer.named_parameters_for_sync,
        )  # fmt: skip
        out[f"distributed_{mb}mb"] = (cfg, transport)
    return out


async def publish_rounds(setup: PublishSetup, args: argparse.Namespace) -> dict[str, list[Any]]:
    """``--publish-rounds`` rounds of one publication by each transport (in turn), through an
    attached fleet of the one server; each publication's :class:`PublishStats` as a dict."""
    fleet_cfg = AttachInference(urls=[setup.url], retries=0, health_interval_s=60.0)
    async with (
        httpx.AsyncClient(timeout=None) as http,
        open_fleet(fleet_cfg, model_dir=setup.work, log_dir=setup.work, http=http) as fleet,
    ):
        clients = {u: SGLangClient(u, http=http, retries=0) for u in fleet.urls}
        publishers = {
            name: Publisher(cfg, fleet=fleet, clients=clients, transport=transport)
            for name, (cfg, transport) in transports(setup, clients, args).items()
        }
        out: dict[str, list[Any]] = {name: [] for name in publishers}
        version = 0
        try:
            for i in range(args.publish_rounds):
                for name, publisher in publishers.items():
                    version += 1
                    stats = await publisher.publish(version)
                    out[name].append(numbers(stats))
                    print(f"  publish {i + 1}/{args.publish_rounds} {name}: "
                          f"{stats.total_s:.2f} s", flush=True)  # fmt: skip
        finally:
            for publisher in publishers.values():
                await publisher.aclose()
    return out


def numbers(stats: PublishStats) -> dict[str, float]:
    """The numeric fields of ``stats`` as floats."""
    return {f: float(getattr(stats, f)) for f in stats.__struct_fields__}


def summarise_publications(runs: list[dict[str, float]]) -> dict[str, Any]:
    """Medians over the publications after the first (all of them if there is only one)."""
    steady = runs[1:] or runs
    keys = ("export_s", "pause_s", "transfer_s", "total_s")
    summary: dict[str, Any] = {f"median_{k}": statistics.median(r[k] for r in steady) for k in keys}
    summary.update({"first_total_s": runs[0]["total_s"], "measured": len(steady), "runs": runs})
    summary["gbytes_per_s"] = runs[0]["bytes"] / summary["median_total_s"] / 1e9
    return summary


def measure_publish(args: argparse.Namespace, setup: PublishSetup) -> dict[str, Any]:
    params = list(setup.trainer.model.parameters())
    count, nbytes = (
        sum(p.numel() for p in params),
        sum(p.numel() * p.element_size() for p in params),
    )
    print(f"publish: {count / 1e6:.1f}M params, {args.publish_dtype}, {nbytes / 1e6:.0f} MB",
          flush=True)  # fmt: skip
    ready_s = setup.wait_ready()
    runs = anyio.run(publish_rounds, setup, args)
    summaries = {name: summarise_publications(r) for name, r in runs.items()}
    disk_s = summaries["disk"]["median_total_s"]
    return {
        "model": {"architecture": "qwen2", "params": count, "dtype": args.publish_dtype,
                  "bytes": nbytes, "hidden": args.publish_hidden, "layers": args.publish_layers,
                  "vocab": args.publish_vocab},
        "server": {"argv": setup.argv[1:], "ready_s": ready_s}, "transports": summaries,
        "speedup_vs_disk": {n: disk_s / s["median_total_s"] for n, s in summaries.items()},
    }  # fmt: skip


# ---- standalone: the demo's shape under load ----------------------------------------------

DEMO_PROMPT = [1, 4, 5, 6, 7]
"""A reverse-digits prompt: BOS and four characters."""


def mode_transport(
    mode: str, setup: PublishSetup, clients: dict[str, SGLangClient]
) -> tuple[WeightsConfig, Transport]:
    """``transport:inflight`` → its config and transport (each mode its own group/folder)."""
    transport, inflight = mode.split(":")
    cfg = WeightsConfig(
        transport=transport,  # type: ignore[arg-type]
        inflight=inflight,  # type: ignore[arg-type]
        step_timeout_s=60.0,
        retries=0,
        keep_versions=1,
    )
    if transport == "disk":
        folder = setup.work / "weights" / mode.replace(":", "_")
        export = setup.trainer.save_hf
        return cfg, DiskTransport(cfg, clients=clients, weights_dir=folder, export=export)
    group = f"bench_{mode.replace(':', '_')}"
    params = setup.trainer.named_parameters_for_sync
    return cfg, DistributedTransport(
        cfg, clients=clients, sender_factory=WeightSender, group_name=group, params=params
    )


async def keep_busy(fleet: Fleet, http: httpx.AsyncClient, tasks: int, done: list[int]) -> None:
    """``tasks`` loops of one short generation each through the fleet's leases (forever)."""
    body = {
        "input_ids": DEMO_PROMPT,
        "sampling_params": {"max_new_tokens": 3, "temperature": 1.0},
        "return_logprob": True,
    }

    async def loop(i: int) -> None:
        while True:
            async with fleet.lease(f"load{i}") as server:
                reply = await http.post(f"{server.url}/generate", json=body, timeout=60.0)
                reply.raise_for_status()
            done[0] += 1

    async with anyio.create_task_group() as tg:
        for i in range(tasks):
            tg.start_soon(loop, i)


async def demo_rounds(setup: PublishSetup, args: argparse.Namespace) -> dict[str, Any]:
    """Every mode publishes once per round (rotating order) while the load runs."""
    fleet_cfg = AttachInference(urls=[setup.url], retries=0, health_interval_s=60.0)
    async with (
        httpx.AsyncClient(timeout=None) as http,
        open_fleet(fleet_cfg, model_dir=setup.work, log_dir=setup.work, http=http) as fleet,
        anyio.create_task_group() as tg,
    ):
        clients = {u: SGLangClient(u, http=http, retries=0) for u in fleet.urls}
        publishers = {}
        for mode in args.modes:
            cfg, transport = mode_transport(mode, setup, clients)
            publishers[mode] = Publisher(cfg, fleet=fleet, clients=clients, transport=transport)
        done = [0]
        tg.start_soon(keep_busy, fleet, http, args.load, done)
        runs: dict[str, list[dict[str, float]]] = {mode: [] for mode in args.modes}
        version, start = 0, time.perf_counter()
        try:
            for i in range(args.rounds):
                order = args.modes[i % len(args.modes) :] + args.modes[: i % len(args.modes)]
                for mode in order:
                    version += 1
                    await anyio.sleep(args.gap_s)  # requests in flight again
                    runs[mode].append(numbers(await publishers[mode].publish(version)))
                print(f"  round {i + 1}/{args.rounds}", flush=True)
        finally:
            elapsed = time.perf_counter() - start
            tg.cancel_scope.cancel()
            for publisher in publishers.values():
                await publisher.aclose()
    return {"runs": runs, "requests_per_s": done[0] / elapsed}


def summarise_modes(runs: dict[str, list[dict[str, float]]]) -> dict[str, Any]:
    """Median ms per mode over the rounds after the first; ratio to ``disk:drain``."""
    out: dict[str, Any] = {}
    for mode, rows in runs.items():
        steady = rows[1:] or rows
        out[mode] = {
            f"median_{k}_ms": 1e3 * statistics.median(r[k] for r in steady)
            for k in ("total_s", "pause_s", "transfer_s", "export_s")
        }
        totals = sorted(r["total_s"] for r in steady)
        out[mode]["p90_total_ms"] = 1e3 * totals[max(0, math.ceil(0.9 * len(totals)) - 1)]
    base = out.get("disk:drain", {}).get("median_total_s_ms")
    for summary in out.values():
        summary["vs_disk_drain"] = summary["median_total_s_ms"] / base if base else None
    return out


def parse_demo_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="publication cost at the demo's shape")
    add = parser.add_argument
    add("--modes", nargs="+", default=MODES, help="transport:inflight pairs")
    add("--rounds", type=int, default=12, help="publications per mode")
    add("--load", type=int, default=64, help="concurrent request loops (0: idle server)")
    add("--gap-s", type=float, default=0.05, help="pause between publications")
    add("--out-dir", type=Path, default=RESULTS_DIR)
    args = parser.parse_args(argv)
    tok = build_char_tokenizer(CharTokenizer(alphabet="0123456789"))
    demo = {"publish_hidden": 64, "publish_intermediate": 128, "publish_layers": 2,
            "publish_heads": 4, "publish_vocab": len(tok), "publish_dtype": "float32"}  # fmt: skip
    for key, value in demo.items():
        setattr(args, key, value)
    return args


MODES = ["disk:drain", "disk:in_place", "distributed:drain", "distributed:in_place"]


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_demo_args(argv)
    with publication_setup(args) as setup:
        setup.wait_ready()
        measured = anyio.run(demo_rounds, setup, args)
    summary = summarise_modes(measured["runs"])
    results = {
        "benchmark": "publish", "machine": machine(), "modes": summary,
        "requests_per_s": measured["requests_per_s"], "runs": measured["runs"],
        "settings": {k: str(v) for k, v in vars(args).items()},
    }  # fmt: skip
    keys = ["median_total_s_ms", "p90_total_ms", "median_pause_s_ms", "vs_disk_drain"]
    print(table(["mode", *keys], [[m, *(s[k] for k in keys)] for m, s in summary.items()]))
    print(f"load: {measured['requests_per_s']:.0f} requests/s; load avg {machine()['load_avg']}")
    print(f"results: {write_json(args.out_dir, 'publish', results)}")
    return results


if __name__ == "__main__":
    main()
