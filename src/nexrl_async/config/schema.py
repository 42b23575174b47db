"""The recipe root: every section of a recipe TOML, with ``[run]``, ``[validation]``, ``[logging]``.

A small recipe stays small: every section but ``[model]``, ``[data]`` and ``[rollout]`` has
defaults.
"""

from __future__ import annotations

from typing import Literal

import msgspec
from msgspec import Struct

from nexrl_async.config.data import DataConfig
from nexrl_async.config.inference import InferenceConfig, LocalInference, WeightsConfig
from nexrl_async.config.model import ModelConfig, TokenizerConfig
from nexrl_async.config.pipeline import FaultsConfig, PoolConfig, StalenessConfig
from nexrl_async.config.rollout import RolloutConfig
from nexrl_async.config.training import (
    AlgorithmConfig,
    CheckpointConfig,
    OptimConfig,
    TrainerConfig,
)
from nexrl_async.config.types import NonNegFloat, NonNegInt, PosInt, RefStr


class RunConfig(Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Identity and length of the run."""

    name: str = "run"
    """Run name (used for the default output folder, the W&B run and the log lines)."""
    seed: int = 0
    """Seed of model init, sampling and shuffling."""
    total_steps: PosInt | None = None
    """Training steps; unset runs until the data is exhausted."""
    output_dir: str = "runs/{name}"
    """Run folder, relative to the working directory; ``{name}`` is replaced."""
    max_wall_s: NonNegFloat | None = None
    """Stop cleanly (checkpoint, flush) after this many seconds."""


class ValidationConfig(Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Validation on its own data; metrics under ``val/``."""

    data: DataConfig | None = None
    """Validation items; validation is off when unset."""
    every_steps: NonNegInt = 0
    """Validate every N steps (0: only before training and at the end)."""
    before_training: bool = True
    """Validate the initial weights."""
    at_end: bool = True
    """Validate the final weights."""
    group_size: PosInt = 1
    """Samples per validation item."""
    temperature: NonNegFloat = 0.0
    """Sampling temperature for validation (0 is greedy)."""
    max_items: PosInt | None = None
    """Validate on at most this many items."""
    worker: RefStr | None = None
    """The validation rollout worker (``file.py:Name`` or ``module:Name``); unset:
    ``rollout.worker``. A worker that generates is scored by rewards (``val/reward_mean``), one
    that does not (SFT answers, DPO pairs) by the trainer's loss. E.g. a DPO recipe trained on
    pairs validates greedy generations with ``"nexrl_async.rollout:RolloutWorker"``."""
    failed_samples: Literal["zero", "exclude"] = "zero"
    """How a FAILED validation sample counts in ``val/reward_mean`` and every
    ``val/<metric>_mean``: ``zero`` scores it 0 (a policy that breaks the evaluator or times
    out does not look better for it), ``exclude`` averages the samples that succeeded only.
    ``val/failed`` counts them either way."""


class WandbConfig(Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Weights & Biases sink (needs the ``wandb`` extra)."""

    enabled: bool = False
    """Log metrics to W&B."""
    project: str = "nexrl_async"
    """W&B project."""
    entity: str | None = None
    """W&B entity."""
    mode: Literal["offline", "online"] = "offline"
    """``offline`` writes under the run folder; sync later with ``wandb sync``."""


QUIET_LOGGERS = (
    "httpx",
    "httpcore",
    "urllib3",
    "requests",
    "openai",
    "anthropic",
    "aiohttp.access",
    "uvicorn.access",
)
"""The default ``logging.quiet_loggers``."""


class LoggingConfig(Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Logs, metrics sinks, samples and the progress line."""

    level: Literal["TRACE", "DEBUG", "INFO", "SUCCESS", "WARNING", "ERROR"] = "INFO"
    """Log level on rank 0 (other ranks log warnings and up)."""
    tensorboard: bool = False
    """Write TensorBoard event files under ``<run>/tensorboard``."""
    wandb: WandbConfig = WandbConfig()
    """W&B sink."""
    samples_every_steps: NonNegInt = 10
    """Dump a few decoded samples to ``<run>/samples/step_<N>.jsonl`` every N steps and at the
    final step (0: never)."""
    progress: bool = True
    """Live progress line on the terminal."""
    quiet_loggers: list[str] = msgspec.field(default_factory=lambda: list(QUIET_LOGGERS))
    """Python (stdlib) loggers held at WARNING in the run's log and console, with their
    children: libraries that log a line per HTTP request (your evaluator's or tool's own
    clients included). Remove a name to see its INFO lines; ``level = "TRACE"`` shows them
    all."""


class RecipeConfig(Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """A whole recipe."""

    model: ModelConfig
    """The policy model."""
    data: DataConfig
    """Training items."""
    rollout: RolloutConfig
    """Rollout workers and user code."""
    extends: str | None = None
    """Base recipe this one extends (resolved at load time; kept for the record)."""
    run: RunConfig = RunConfig()
    """Identity and length of the run."""
    tokenizer: TokenizerConfig | None = None
    """Tokenizer; defaults to the one in the model folder."""
    pool: PoolConfig = PoolConfig()
    """Trajectory pool."""
    staleness: StalenessConfig = StalenessConfig()
    """Staleness control."""
    faults: FaultsConfig = FaultsConfig()
    """When failing samples stop the run (a failure-rate breaker)."""
    algorithm: AlgorithmConfig = AlgorithmConfig()
    """Learning rule."""
    optim: OptimConfig = OptimConfig()
    """Optimizer."""
    trainer: TrainerConfig = TrainerConfig()
    """Training ranks."""
    inference: InferenceConfig = LocalInference()
    """Inference servers."""
    weights: WeightsConfig = WeightsConfig()
    """Weight publication."""
    validation: ValidationConfig = ValidationConfig()
    """Validation."""
    checkpoint: CheckpointConfig = CheckpointConfig()
    """Checkpoints."""
    logging: LoggingConfig = LoggingConfig()
    """Logging and metrics."""
