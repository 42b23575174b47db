"""Preflight of a loaded recipe: every referenced file exists and every ``file.py:Name`` imports.

Used by ``nexrl-async check`` and at the start of ``run`` so mistakes surface before any compute.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

from nexrl_async.config.checks import vllm_cpu_reload
from nexrl_async.config.data import (
    DataConfig,
    HFData,
    HFDiskData,
    JsonlData,
    MixtureData,
    ParquetData,
    PythonData,
    SourceConfig,
    sources_of,
)
from nexrl_async.config.hub_cache import cache_problem
from nexrl_async.config.loader import LoadedRecipe
from nexrl_async.config.model import BuiltModel, PretrainedModel, PretrainedTokenizer
from nexrl_async.config.schema import RecipeConfig
from nexrl_async.config.tree import tag_of
from nexrl_async.core.errors import ConfigError, UserCodeError
from nexrl_async.core.usercode import load_object


def user_refs(cfg: RecipeConfig) -> Iterator[tuple[str, str]]:
    """``(dotted path, ref)`` for every user-code reference of the recipe."""
    yield "rollout.evaluator", cfg.rollout.evaluator
    if cfg.rollout.worker:
        yield "rollout.worker", cfg.rollout.worker
    for i, tool in enumerate(cfg.rollout.tools):
        yield f"rollout.tools.{i}", tool
    if cfg.algorithm.prepare_batch:
        yield "algorithm.prepare_batch", cfg.algorithm.prepare_batch
    if isinstance(cfg.algorithm.loss, str):  # the Python API may set a callable instead
        yield "algorithm.loss", cfg.algorithm.loss
    if cfg.validation.worker:
        yield "validation.worker", cfg.validation.worker
    for dotted, source in _sources(cfg):
        if isinstance(source, PythonData):
            yield f"{dotted}.factory", source.factory
        if source.evaluator is not None:
            yield f"{dotted}.evaluator", source.evaluator


def data_paths(cfg: RecipeConfig) -> Iterator[tuple[str, str]]:
    """``(dotted path, path)`` for every file or folder the recipe reads."""
    if isinstance(cfg.model, PretrainedModel):
        yield "model.path", cfg.model.path
    if isinstance(cfg.tokenizer, PretrainedTokenizer):
        yield "tokenizer.path", cfg.tokenizer.path
    for dotted, source in _sources(cfg):
        if isinstance(source, JsonlData | ParquetData | HFDiskData):
            yield f"{dotted}.path", source.path


def _sources(cfg: RecipeConfig) -> Iterator[tuple[str, SourceConfig]]:
    """Every data source of the recipe (a mixture's one by one), with its dotted path."""
    yield from sources_of("data", cfg.data)
    if cfg.validation.data is not None:
        yield from sources_of("validation.data", cfg.validation.data)


def preflight(loaded: LoadedRecipe) -> None:
    """Raise ConfigError for the first missing path or unloadable user-code reference."""
    cfg = loaded.config
    for dotted, path in data_paths(cfg):
        if not Path(path).exists():
            raise ConfigError(f"{dotted} = {path!r}: no such file or folder", file=str(loaded.path))
    for dotted, source in _sources(cfg):
        if isinstance(source, HFData) and (problem := cache_problem(source)):
            raise ConfigError(
                f"{dotted}.dataset = {source.dataset!r}: {problem}",
                file=str(loaded.path),
                path=f"{dotted}.dataset",
            )
    for dotted, ref in user_refs(cfg):
        try:
            load_object(ref, loaded.base_dir)
        except UserCodeError as err:
            raise ConfigError(f"{dotted}: {err}", file=str(loaded.path), path=dotted) from err
    served = vllm_cpu_reload(cfg)
    if served and isinstance(cfg.model, PretrainedModel) and _tied(Path(cfg.model.path)):
        raise ConfigError(
            f"model.path = {cfg.model.path!r}: its config.json ties the word embeddings, and with "
            f"{served} a disk reload leaves the tied LM head on the old weights "
            "(docs/vllm.md §6.1); serve a copy with untied embeddings",
            file=str(loaded.path),
            path="model.path",
        )


def _tied(model_dir: Path) -> bool:
    """Whether the HF folder's ``config.json`` says ``tie_word_embeddings: true``."""
    try:
        config = json.loads((model_dir / "config.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and config.get("tie_word_embeddings") is True


def summary(loaded: LoadedRecipe) -> str:
    """A short human-readable description of what the recipe will do."""
    cfg = loaded.config
    model = cfg.model
    if isinstance(model, BuiltModel):
        what = f"built {model.architecture} ({model.num_hidden_layers}×{model.hidden_size})"
    else:
        what = model.path
    k = cfg.staleness.k
    source = _describe(cfg.data)
    algo = cfg.algorithm
    lines = [
        f"recipe     {loaded.path}"
        + (f" (extends {len(loaded.files) - 1})" if len(loaded.files) > 1 else ""),
        f"model      {what}, {model.dtype}",
        f"data       {tag_of(cfg.data)}: {source}",
        f"rollout    {cfg.rollout.workers} workers × group {cfg.rollout.group_size}, "
        f"max_turns {cfg.rollout.max_turns}, max_new_tokens {cfg.rollout.max_new_tokens}",
        f"evaluator  {cfg.rollout.evaluator}",
        f"pipeline   {cfg.staleness.mode} (k = {'∞' if k is None else k}), "
        f"batch {cfg.pool.batch_groups} groups, on_overdue {cfg.staleness.on_overdue}",
        f"algorithm  {algo.mode} / {algo.estimator}, loss {algo.loss_agg}, lr {cfg.optim.lr:g}",
        f"inference  {tag_of(cfg.inference)}, weights by {cfg.weights.transport} "
        f"({cfg.weights.inflight})",
        f"steps      {cfg.run.total_steps or 'until data is exhausted'}",
    ]
    return "\n".join(lines)


def _describe(data: DataConfig) -> str:
    """What the summary says a source reads."""
    if isinstance(data, MixtureData):
        total = sum(s.weight for s in data.sources)
        return ", ".join(f"{s.name} {s.weight / total:.0%} ({_describe(s)})" for s in data.sources)
    if isinstance(data, HFData):
        return data.dataset + (f" ({data.subset})" if data.subset else "")
    if isinstance(data, PythonData):
        return data.factory
    return data.path
