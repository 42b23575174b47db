"""How a run reports itself: the progress line, validation loss, sample dumps (every
``logging.samples_every_steps`` steps and at the last step) and plots redrawn while it runs.

What differs between the objectives is decided once, in :meth:`Reporting.for_run`: an RL run
shows the reward, staleness and throughput; an SFT or DPO run (``algorithm.mode = "sft"`` or
``"dpo"``: no rewards, no generated tokens) shows the training loss. Validation is scored by
reward when the validation worker generates, and otherwise by the trainer
(:meth:`~nexrl_async.core.protocols.PolicyTrainer.validation_loss`: SFT's held-out loss
``val/loss``, ``val/ppl``; DPO's held-out preference accuracy).
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio

from nexrl_async.core.protocols import PolicyTrainer
from nexrl_async.core.records import TrainBatch
from nexrl_async.engine.context import RunContext
from nexrl_async.engine.samples import write_samples
from nexrl_async.engine.validator import LossFn
from nexrl_async.obs.plots import write_plots
from nexrl_async.obs.progress import ProgressLine

RL_PROGRESS = {
    "reward": "rollout/reward_mean",
    "staleness": "pipeline/staleness_mean",
    "tokens_per_s": "throughput/tokens_per_s",
}
SFT_PROGRESS = {"loss": "train/loss"}
PLOTS_EVERY_S = 300.0
"""How often a running run redraws ``plots/`` (the run's end always draws them)."""


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
    metrics_path: Path
    plots_dir: Path
    plots_every_s: float = PLOTS_EVERY_S
    plotted_at: float = field(default_factory=time.monotonic)
    undumped: TrainBatch | None = None
    """The last trained batch, while its samples are not written (:meth:`dump_final`)."""

    @classmethod
    def for_run(
        cls,
        ctx: RunContext,
        trainer: PolicyTrainer,
        limiter: anyio.CapacityLimiter,
        *,
        validation_generates: bool = True,
    ) -> Reporting:
        """``validation_generates``: the validation worker's ``generates``."""
        # the one place the engine tells RL from the data-driven objectives (SFT, DPO)
        sft = ctx.cfg.algorithm.mode != "rl"

        async def loss(batch: TrainBatch) -> dict[str, float]:
            result = await anyio.to_thread.run_sync(trainer.validation_loss, batch, limiter=limiter)
            return dict(result)

        return cls(
            progress_line=ProgressLine(
                ctx.cfg.run.total_steps, terminal=ctx.terminal, enabled=ctx.cfg.logging.progress
            ),
            progress_keys=SFT_PROGRESS if sft else RL_PROGRESS,
            validation_loss=None if validation_generates else loss,
            samples_every=ctx.cfg.logging.samples_every_steps,
            samples_dir=ctx.run_dir.samples_dir,
            tokenizer=trainer.tokenizer,
            metrics_path=ctx.run_dir.metrics_path,
            plots_dir=ctx.run_dir.plots_dir,
        )

    def progress(self, step: int, metrics: Mapping[str, float]) -> None:
        """Redraw the progress line after ``step`` steps."""
        shown = {field: metrics.get(key) for field, key in self.progress_keys.items()}
        self.progress_line.update(step, **shown)

    async def dump_samples(self, batch: TrainBatch) -> None:
        """``samples/step_<s>.jsonl`` every ``logging.samples_every_steps`` steps; the plots
        every ``plots_every_s`` seconds."""
        every = self.samples_every
        self.undumped = batch if every else None
        if every and batch.step % every == 0:
            await self._write(batch)
        if time.monotonic() - self.plotted_at >= self.plots_every_s:
            self.plotted_at = time.monotonic()
            await anyio.to_thread.run_sync(write_plots, self.metrics_path, self.plots_dir)

    async def dump_final(self) -> None:
        """The samples of the run's last trained step, unless its step was dumped already
        (``logging.samples_every_steps = 0`` writes none)."""
        if self.undumped is not None:
            await self._write(self.undumped)

    async def _write(self, batch: TrainBatch) -> None:
        self.undumped = None
        path = self.samples_dir / f"step_{batch.step:06d}.jsonl"
        await anyio.to_thread.run_sync(write_samples, path, batch, self.tokenizer)
