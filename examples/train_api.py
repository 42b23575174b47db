"""Train the reverse-digits demo from Python: a plain reward function, a callback, a RunResult.

    python examples/train_api.py                      # 150 steps, about two minutes on a laptop
    python examples/train_api.py --steps 3 --small    # what CI runs

Nothing here is a file the engine loads by name: the rows, the reward function and the
callback are Python objects handed to ``nexrl_async.grpo`` (docs/api.md).
"""

from __future__ import annotations

import argparse
import json
import random
from typing import Any

import nexrl_async

TINY_QWEN2 = {
    "kind": "build",
    "architecture": "qwen2",
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "max_position_embeddings": 32,
}
DIGITS = {"kind": "chars", "alphabet": "0123456789"}


def make_rows(count: int, seed: int) -> list[dict[str, str]]:
    """Two-digit strings; the model must answer with the digits reversed."""
    rng = random.Random(seed)
    rows = []
    for _ in range(count):
        text = "".join(rng.choice("0123456789") for _ in range(2))
        rows.append({"prompt": f"<bos>{text}<sep>", "answer": text[::-1]})
    return rows


def reward(response: str, item: dict[str, Any]) -> dict[str, float]:
    """Fraction of the answer's positions the response gets right; exact match as a metric."""
    answer = item["answer"]
    response = response.strip()
    right = sum(a == b for a, b in zip(answer, response, strict=False))
    return {"reward": right / len(answer), "exact": float(response[: len(answer)] == answer)}


class RewardLog:
    """Records each step's mean reward and prints each validation."""

    def __init__(self) -> None:
        self.rewards: list[float] = []
        self.validations: list[float | None] = []

    def on_step_end(self, event: nexrl_async.StepEnd, run: nexrl_async.RunControl) -> None:
        self.rewards.append(event.metrics["rollout/reward_mean"])

    def on_validation(self, event: nexrl_async.Validation, run: nexrl_async.RunControl) -> None:
        self.validations.append(event.metrics.get("val/reward_mean"))
        print(f"validation after {event.step} steps: {event.metrics.get('val/reward_mean')}")


def main(argv: list[str] | None = None) -> nexrl_async.RunResult:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--output", default="runs/train_api")
    parser.add_argument("--small", action="store_true", help="small batches (CI)")
    args = parser.parse_args(argv)
    log = RewardLog()
    batch_groups, group_size = (4, 4) if args.small else (32, 8)
    result = nexrl_async.grpo(
        model=TINY_QWEN2,
        tokenizer=DIGITS,
        dataset=make_rows(20000, seed=0),
        validation=make_rows(64, seed=12345),
        reward=reward,
        steps=args.steps,
        output=args.output,
        group_size=group_size,
        batch_groups=batch_groups,
        max_new_tokens=3,
        lr=1e-3,
        chat_template=False,
        overrides={
            "algorithm.entropy_coef": 0.01,
            "rollout.workers": 4 if args.small else 16,
            "validation.temperature": 0.0,
            "validation.every_steps": 0 if args.small else 25,
            "trainer.threads": 1,
            "inference": {"backend": "local", "extra_args": ["--torch-threads", "1"]},
            "logging.progress": not args.small,
        },
        callbacks=[log],
    )
    summary = {
        "reason": result.reason,
        "steps_seen_by_callback": len(log.rewards),
        "first_rewards": log.rewards[:3],
        "val/reward_mean": result.metrics.get("val/reward_mean"),
        "rollout/exact_mean": result.metrics.get("rollout/exact_mean"),
        "run_dir": str(result.run_dir),
    }
    print(json.dumps(summary))
    return result


if __name__ == "__main__":
    main()
