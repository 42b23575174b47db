"""What a trainer is built from: the recipe's training sections, picked once.

```
spec = TrainerSpec.from_recipe(cfg, base_dir)   # cfg: RecipeConfig, base_dir: the recipe's folder
trainer = Trainer.from_spec(spec)               # world size 1
trainer = Trainer.from_spec(spec, groups=groups)  # this rank's share at world size > 1
```

Every builder (the engine at world size 1, rank 0's distributed handle, the followers) goes
through :class:`TrainerSpec`, so a new trainer setting is added in one place.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from nexrl_async.config.model import ModelConfig, TokenizerConfig
from nexrl_async.config.schema import RecipeConfig
from nexrl_async.config.training import AlgorithmConfig, OptimConfig, TrainerConfig


@dataclass(frozen=True, kw_only=True)
class TrainerSpec:
    """The trainer's own view of a recipe.

    Attributes:
        model: ``[model]``: the policy to load or build.
        tokenizer: ``[tokenizer]`` (``None``: the model folder's).
        algorithm: ``[algorithm]``.
        optim: ``[optim]``.
        trainer: ``[trainer]``.
        seed: ``run.seed`` (weights of a built model, dropout).
        max_new_tokens: ``rollout.max_new_tokens``: the overlong penalty's limit and the
            constant normaliser of ``loss_agg = "seq-mean-token-sum-norm"``.
        total_steps: ``run.total_steps``; the linear and cosine schedules need it.
        temperature: ``rollout.sampling.temperature``: log-probs use ``logits / temperature``
            like the server's.
        base_dir: the recipe's folder (``algorithm.prepare_batch`` is relative to it).
    """

    model: ModelConfig
    tokenizer: TokenizerConfig | None
    algorithm: AlgorithmConfig
    optim: OptimConfig
    trainer: TrainerConfig
    seed: int = 0
    max_new_tokens: int
    total_steps: int | None = None
    temperature: float = 1.0
    base_dir: Path = Path()

    @classmethod
    def from_recipe(cls, cfg: RecipeConfig, base_dir: Path) -> TrainerSpec:
        return cls(
            model=cfg.model,
            tokenizer=cfg.tokenizer,
            algorithm=cfg.algorithm,
            optim=cfg.optim,
            trainer=cfg.trainer,
            seed=cfg.run.seed,
            max_new_tokens=cfg.rollout.max_new_tokens,
            total_steps=cfg.run.total_steps,
            temperature=cfg.rollout.sampling.temperature,
            base_dir=base_dir,
        )
