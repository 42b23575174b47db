"""How a run reports itself: the progress line, validation loss and sample dumps.

What differs between the objectives is decided once, in :meth:`Reporting.for_run`: an RL run
shows the reward, staleness and throughput and validates by reward; an SFT run
(``algorithm.mode = "sft"``: no rewards, no generated tokens) shows the training loss and also
validates by the held-out loss (``val/loss``, ``val/ppl``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio

from nexrl_async.core.protocols import PolicyTrainer
from nexrl_async.core.records import TrainBatch
from nexrl_async.engine.context import RunContext
from nexrl_async.engine.samples import write_samples
from nexrl_async.engine.validator import LossFn
from nexrl_async.obs.progress import ProgressLine

RL_PROGRESS = {
    "reward": "rollout/reward_mean",
    "staleness": "pipeline/staleness_mean",
    "tokens_per_s": "throughput/tokens_per_s",
}
SFT_PROGRESS = {"loss": "train/loss"}


@dataclass(kw_only=True)
class Reporting:
    """The run's reporting choices; see the module docstring."""

    progress_line: ProgressLine
    progress_keys: Mapping[str, str]
    """Progress-line field → the metric it shows."""
    validation_loss: LossFn | None
    samples_every: int
    samples_dir: Path
    tokenizer: Any

    @classmethod
    def for_run(
        cls, ctx: RunContext, trainer: PolicyTrainer, limiter: anyio.CapacityLimiter
    ) -> Reporting:
        sft = ctx.cfg.algorithm.mode == "sft"  # the one place the engine tells SFT from RL

        async def loss(batch: TrainBatch) -> dict[str, float]:
            result = await anyio.to_thread.run_sync(trainer.validation_loss, batch, limiter=limiter)
            return dict(result)

        return cls(
            progress_line=ProgressLine(
                ctx.cfg.run.total_steps, terminal=ctx.terminal, enabled=ctx.cfg.logging.progress
            ),
            progress_keys=SFT_PROGRESS if sft else RL_PROGRESS,
            validation_loss=loss if sft else None,
            samples_every=ctx.cfg.logging.samples_every_steps,
            samples_dir=ctx.run_dir.samples_dir,
            tokenizer=trainer.tokenizer,
        )

    def progress(self, step: int, metrics: Mapping[str, float]) -> None:
        """Redraw the progress line after ``step`` steps."""
        shown = {field: metrics.get(key) for field, key in self.progress_keys.items()}
        self.progress_line.update(step, **shown)

    async def dump_samples(self, batch: TrainBatch) -> None:
        """``samples/step_<s>.jsonl`` every ``logging.samples_every_steps`` steps."""
        every = self.samples_every
        if every and batch.step % every == 0:
            path = self.samples_dir / f"step_{batch.step:06d}.jsonl"
            await anyio.to_thread.run_sync(write_samples, path, batch, self.tokenizer)
