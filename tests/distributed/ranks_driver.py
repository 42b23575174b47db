"""One training rank for the distributed tests (a script: spawned children cannot import test
modules under pytest's importlib mode).

    python ranks_driver.py SCENARIO WORK_DIR        (RANK, WORLD_SIZE, MASTER_* in the env,
                                                     set by the test or by torchrun)

``WORK_DIR`` holds ``recipe.json`` (a RecipeConfig) and ``batch0.msgpack``, ``batch1.msgpack``
(TrainBatches); results go to ``WORK_DIR/out``. Rank 0 drives the run through
``make_trainer`` (a DistributedTrainer), every other rank runs ``run_follower``.

Scenarios:
- ``train``: SIGTERM to rank 1 (which must ignore it), two steps, log-probs, a checkpoint round
  trip (save, a third step, load), an HF export and a weight sync, then shutdown. Rank 0 writes
  ``out/rank0.json`` (metrics, log-probs, what the round trip restored) and ``out/sync.pt``; the
  HF folder is ``out/hf``.
- ``fail``: one step whose ``prepare_batch`` raises on rank ``FAIL_RANK``; rank 0 records the
  error it got (``out/rank0.json``: type, message, seconds), then shuts down.
- ``die``: rank 0 builds its trainer, writes ``out/died_at`` (``time.time()``), then its
  process ends abruptly (exit code 3).

Every rank writes its exit code to ``out/exit<rank>``. The tests load this file by path for
its helpers (:func:`recipe`, :func:`batches`, :func:`prepare`, :func:`launch`).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import msgspec
import torch

from nexrl_async.config.schema import RecipeConfig
from nexrl_async.core.errors import TrainError
from nexrl_async.core.process import exit_process
from nexrl_async.core.records import Group, TrainBatch, Trajectory, Turn, VersionToken
from nexrl_async.train.ranks.follower import run_follower
from nexrl_async.train.ranks.handle import DistributedTrainer, make_trainer
from nexrl_async.train.ranks.topology import open_process_groups
from nexrl_async.train.spec import TrainerSpec

# ---- helpers for the tests --------------------------------------------------------------------


def recipe(**sections: Any) -> dict[str, Any]:
    """A tiny RL recipe (CPU, 2-layer model, small micro-batches) as a dict; ``sections``
    replace or extend its top-level sections."""
    base: dict[str, Any] = {
        "run": {"seed": 0},
        "model": {
            "kind": "build",
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
        },
        "tokenizer": {"kind": "chars"},
        "data": {"kind": "jsonl", "path": "unused.jsonl"},
        "rollout": {"evaluator": "unused.py:Evaluator", "max_new_tokens": 8},
        "algorithm": {
            "loss_agg": "seq-mean-token-mean",
            "minibatches": 3,
            "entropy_coef": 0.01,
            "kl": {"placement": "loss", "kind": "k3", "coef": 0.1},
        },
        # eps = 1 keeps the first Adam steps linear in the gradient (no sign() of tiny entries)
        "optim": {"lr": 0.5, "eps": 1.0, "max_grad_norm": 0.5},
        "trainer": {
            "device": "cpu",
            "micro_batch_tokens": 16,
            "threads": 1,
            "activation_checkpointing": True,
            "collective_timeout_s": 30.0,
        },
    }
    for name, value in sections.items():
        if isinstance(value, dict) and isinstance(base.get(name), dict):
            base[name] = {**base[name], **value}
        else:
            base[name] = value
    return base


def _traj(group: str, index: int, prompt: list[int], response: list[int], reward: float) -> Any:
    logprobs = [-0.5 - 0.1 * i for i in range(len(response))]
    return Trajectory(
        group_id=group,
        item_key=group,
        sample_index=index,
        token=VersionToken(lease_id=0, version=0),
        reward=reward,
        turns=[
            Turn(role="user", token_ids=prompt, loss_mask=[0] * len(prompt)),
            Turn(
                role="assistant",
                token_ids=response,
                loss_mask=[1] * len(response),
                logprobs=logprobs,
            ),
        ],
    )


def batches() -> list[TrainBatch]:
    """Two steps of 5 ragged trajectories in 2 groups (token ids < 14, the char vocab)."""
    a = [
        _traj("a", 0, [1, 4, 5], [6, 7, 8, 9, 2], 1.0),
        _traj("a", 1, [1, 4, 5], [6, 2], 0.0),
        _traj("a", 2, [1, 4, 5], [10, 11, 12, 13, 4, 5, 6, 7, 8, 2], 0.5),
    ]
    b = [_traj("b", 0, [1, 12, 3], [13, 2], 1.0), _traj("b", 1, [1, 12, 3], [9, 9, 9, 2], 0.0)]
    token = VersionToken(lease_id=0, version=0)
    groups = [
        Group(group_id=g[0].group_id, item_key=g[0].item_key, token=token, trajectories=g)
        for g in (a, b)
    ]
    return [TrainBatch(step=step, groups=groups) for step in range(2)]


def prepare(work: Path, recipe_dict: dict[str, Any]) -> RecipeConfig:
    """Write the recipe and the batches into ``work``; returns the recipe."""
    work.mkdir(parents=True, exist_ok=True)
    cfg = msgspec.convert(recipe_dict, RecipeConfig)
    (work / "recipe.json").write_bytes(msgspec.json.encode(cfg))
    for i, batch in enumerate(batches()):
        (work / f"batch{i}.msgpack").write_bytes(msgspec.msgpack.encode(batch))
    return cfg


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def launch(
    scenario: str, work: Path, *, world_size: int = 2, timeout: float = 60.0, **env: str
) -> list[tuple[int, str]]:
    """Run ``world_size`` ranks of this script as subprocesses; ``(exit code, output)`` each.

    Ranks still running after ``timeout`` seconds are killed (exit code -9)."""
    base = {
        **os.environ,
        **env,
        "WORLD_SIZE": str(world_size),
        "LOCAL_WORLD_SIZE": str(world_size),
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(free_port()),
        "OMP_NUM_THREADS": "1",
    }
    procs = [
        subprocess.Popen(
            [sys.executable, __file__, scenario, str(work)],
            env={**base, "RANK": str(rank), "LOCAL_RANK": str(rank)},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        for rank in range(world_size)
    ]
    deadline = time.monotonic() + timeout
    results: list[tuple[int, str]] = []
    try:
        for proc in procs:
            try:
                output, _ = proc.communicate(timeout=max(deadline - time.monotonic(), 0.1))
            except subprocess.TimeoutExpired:
                proc.kill()
                output, _ = proc.communicate()
            results.append((proc.returncode, output.decode(errors="replace")))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return results


# ---- one rank ---------------------------------------------------------------------------------


def _rank0(scenario: str, cfg: RecipeConfig, work: Path, trainer: DistributedTrainer) -> None:
    out = work / "out"
    steps = [
        msgspec.msgpack.decode((work / f"batch{i}.msgpack").read_bytes(), type=TrainBatch)
        for i in range(2)
    ]
    if scenario == "die":
        (out / "died_at").write_text(repr(time.time()))
        os._exit(3)
    if scenario == "fail":
        started = time.monotonic()
        try:
            trainer.step(steps[0])
            result: dict[str, Any] = {"error": None}
        except TrainError as err:
            result = {"error": type(err).__name__, "message": str(err)}
        result["seconds"] = time.monotonic() - started
        try:
            trainer.step(steps[1])
        except TrainError as err:
            result["after"] = str(err)
        trainer.shutdown()
        (out / "rank0.json").write_text(json.dumps(result))
        return
    # followers ignore SIGTERM: rank 0 decides when they stop (and may still need them)
    follower = int((out / "pid1").read_text())
    os.kill(follower, signal.SIGTERM)
    time.sleep(0.5)
    metrics = [trainer.step(batch) for batch in steps]
    logprobs = trainer.compute_logprobs(steps[0])
    # a DCP checkpoint round trip: save, train on, load, the weights are back
    trainer.save_checkpoint(out / "ckpt")
    trainer.step(msgspec.structs.replace(steps[1], step=2))
    moved = trainer.compute_logprobs(steps[0])
    trainer.load_checkpoint(out / "ckpt")
    restored = {
        "steps_done": trainer.steps_done,
        "logprobs": trainer.compute_logprobs(steps[0]),
        "moved": moved,
    }
    trainer.save_hf(out / "hf")
    synced = {name: tensor.clone() for name, tensor in trainer.named_parameters_for_sync()}
    torch.save(synced, out / "sync.pt")
    trainer.shutdown("done")
    result = {"metrics": metrics, "logprobs": logprobs, "restored": restored}
    (out / "rank0.json").write_text(json.dumps(result))


def main(scenario: str, work: Path) -> int:
    torch.set_num_threads(1)
    cfg = msgspec.json.decode((work / "recipe.json").read_bytes(), type=RecipeConfig)
    (work / "out").mkdir(exist_ok=True)
    (work / "out" / f"pid{os.environ.get('RANK', '0')}").write_text(str(os.getpid()))
    with open_process_groups(cfg.trainer) as groups:
        if groups.rank != 0:
            return run_follower(cfg, work, groups)
        trainer = make_trainer(TrainerSpec.from_recipe(cfg, work), groups)
        assert isinstance(trainer, DistributedTrainer)
        _rank0(scenario, cfg, work, trainer)
        return 0


if __name__ == "__main__":
    work_dir = Path(sys.argv[2])
    code = main(sys.argv[1], work_dir)
    (work_dir / "out" / f"exit{os.environ.get('RANK', '0')}").write_text(str(code))
    exit_process(code)  # as the CLI ends
