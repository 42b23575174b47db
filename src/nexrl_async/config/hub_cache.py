"""Where a Hugging Face Hub dataset sits in the local ``datasets`` cache, without the network.

``datasets.load_dataset("namespace/name", subset)`` stores what it downloaded and prepared under
``<cache>/<namespace>___<name>/<subset>/<version>/<hash>/`` (``<name>`` in snake case, the
subset ``default`` when the dataset has none). In offline mode ``load_dataset`` resolves a
dataset from exactly that folder, so a recipe's ``kind = "hf"`` source is usable offline iff
such a folder exists. :func:`cache_problem` says so before the run (``nexrl-async check``); the
reader (``data/hub.py``) then loads it with ``load_dataset`` in offline mode.
"""

from __future__ import annotations

import os
from pathlib import Path

from nexrl_async.config.data import HFData


def datasets_cache(cache_dir: str | None = None) -> Path:
    """The ``datasets`` cache folder: ``cache_dir``, else ``$HF_DATASETS_CACHE``, else
    ``$HF_HOME/datasets``, else ``$XDG_CACHE_HOME/huggingface/datasets`` (``~/.cache``).

    Read from the environment at every call (the ``datasets`` package reads it once, at import).
    """
    if cache_dir:
        return Path(cache_dir).expanduser()
    if env := os.environ.get("HF_DATASETS_CACHE"):
        return Path(env).expanduser()
    if home := os.environ.get("HF_HOME"):
        return Path(home).expanduser() / "datasets"
    xdg = os.environ.get("XDG_CACHE_HOME") or "~/.cache"
    return Path(xdg).expanduser() / "huggingface" / "datasets"


def dataset_folder(cache: Path, dataset: str) -> Path:
    """``<cache>/<namespace>___<name>`` (or ``<cache>/<name>``), as ``datasets`` names it."""
    from datasets.naming import camelcase_to_snakecase

    *namespace, name = dataset.split("/")
    return cache / "___".join([*namespace, camelcase_to_snakecase(name)])


def cached_subsets(cfg: HFData) -> list[str]:
    """The subsets of ``cfg.dataset`` the cache holds a prepared copy of, sorted."""
    root = dataset_folder(datasets_cache(cfg.cache_dir), cfg.dataset)
    found = {p.parts[-3] for p in root.glob("*/*/*") if (p / "dataset_info.json").is_file()}
    return sorted(found)


def cache_problem(cfg: HFData) -> str | None:
    """Why ``cfg`` cannot be loaded offline, or ``None`` when its cache folder is there."""
    try:
        subsets = cached_subsets(cfg)
    except ImportError:
        return "kind = 'hf' needs the `datasets` package: pip install 'nexrl-async[datasets]'"
    cache = datasets_cache(cfg.cache_dir)
    if not subsets:
        return (
            f"dataset {cfg.dataset!r} is not in the local Hugging Face cache {cache} (looked for "
            f"{dataset_folder(cache, cfg.dataset).name}/<subset>/<version>/<hash>); the network "
            "is never used: load it once where the Hub is reachable (datasets.load_dataset), "
            "then copy or point HF_DATASETS_CACHE / cache_dir at that cache"
        )
    if cfg.subset is not None and cfg.subset not in subsets:
        return f"dataset {cfg.dataset!r}: subset {cfg.subset!r} is not cached; cached: {subsets}"
    if cfg.subset is None and len(subsets) > 1:
        return f"dataset {cfg.dataset!r} has several cached subsets {subsets}: set subset"
    return None
