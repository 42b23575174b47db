"""Everything one run holds that is not a task: the run folder, ledger, metrics, recipe.

Built once by :func:`open_run` before the event loop starts (blocking file work is fine here),
closed once at the end whatever happened.
"""

from __future__ import annotations

import hashlib
import os
import secrets
from pathlib import Path

import msgspec

from nexrl_async.config.inference import AttachInference, InferenceConfig, NoInference
from nexrl_async.config.loader import LoadedRecipe, dump_recipe
from nexrl_async.config.schema import RecipeConfig
from nexrl_async.obs import (
    MetricsHub,
    RunDir,
    RunLedger,
    RunStarted,
    Terminal,
    build_sinks,
    setup_logging,
)
from nexrl_async.obs.plots import write_plots


class RunContext(msgspec.Struct, kw_only=True, dict=True):
    """The run's records and its recipe."""

    recipe: LoadedRecipe
    run_dir: RunDir
    ledger: RunLedger
    metrics: MetricsHub
    terminal: Terminal

    @property
    def cfg(self) -> RecipeConfig:
        return self.recipe.config

    @property
    def base_dir(self) -> Path:
        return self.recipe.base_dir

    def close(self) -> None:
        """Flush and close the records, then draw ``plots/`` from ``metrics.jsonl``."""
        self.metrics.close()
        self.ledger.close()
        write_plots(self.run_dir.metrics_path, self.run_dir.plots_dir)


def launch_key(inference: InferenceConfig) -> InferenceConfig:
    """``inference`` with a random ``api_key`` where the engine launches the servers and the
    recipe set none: no other local process can then pause them or swap their weights.
    Attached servers keep the configured key (or none). Hex, so that no key begins with
    ``-`` and a command template's ``--api-key {api_key}`` parses."""
    if isinstance(inference, AttachInference | NoInference) or inference.api_key is not None:
        return inference
    return msgspec.structs.replace(inference, api_key=secrets.token_hex(24))


def output_dir(recipe: LoadedRecipe, output: Path | None) -> Path:
    """``--output`` if given, else ``run.output_dir`` with ``{name}`` filled in."""
    if output is not None:
        return output
    run = recipe.config.run
    return Path(run.output_dir.replace("{name}", run.name))


def open_run(
    recipe: LoadedRecipe,
    output: Path | None,
    *,
    resume: bool,
    resumed_from: Path | None = None,
) -> RunContext:
    """Create the run folder, write the resolved recipe, start logs, metrics and the ledger.

    ``resume`` reuses an existing run folder (records are appended); ``resumed_from`` is the
    checkpoint the run continues from, recorded in ``run_started``.
    """
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # type: ignore[no-untyped-call]
    cfg = recipe.config
    run_dir = RunDir.create(output_dir(recipe, output), resume=resume)
    text = dump_recipe(cfg)
    run_dir.config_path.write_text(text, encoding="utf-8")
    terminal = setup_logging(
        level=cfg.logging.level, rank=0, run_dir=run_dir.root, quiet=cfg.logging.quiet_loggers
    )
    sinks = build_sinks(cfg.logging, run_dir, msgspec.to_builtins(cfg))
    ledger = RunLedger(run_dir.events_path)
    config_hash = hashlib.sha256(text.encode()).hexdigest()[:16]
    origin = None if resumed_from is None else str(resumed_from)
    ledger.emit(RunStarted(config_hash=config_hash, resumed_from=origin))
    # after the recipe is written and hashed: the key is never on disk
    keyed = msgspec.structs.replace(cfg, inference=launch_key(cfg.inference))
    return RunContext(
        recipe=msgspec.structs.replace(recipe, config=keyed),
        run_dir=run_dir,
        ledger=ledger,
        metrics=MetricsHub(sinks),
        terminal=terminal,
    )
