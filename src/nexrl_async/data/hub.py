"""``kind = "hf"``: a Hugging Face Hub dataset by name, from the local cache, never the network.

``datasets.load_dataset(dataset, subset, split=..., cache_dir=...)`` runs with the library's
offline switch on (``datasets.config.HF_HUB_OFFLINE``, which it reads once at import, so the
environment variable alone would be too late), so it resolves the name from the prepared copy
a previous download left in the cache (``config/hub_cache.py`` describes the folder) and raises
instead of reaching out. The switch (and the library's log level: its warnings that the Hub
could not be reached say what is intended here) is restored afterwards. What it cannot resolve
becomes a :class:`DataError` naming the dataset and the cache.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from nexrl_async.config.data import HFData
from nexrl_async.config.hub_cache import cache_problem, datasets_cache
from nexrl_async.core.errors import DataError

Row = dict[str, Any]

_OFFLINE_LOCK = threading.Lock()
"""Serialises the flip of the library-wide offline switch (readers run in worker threads)."""


def read_hf(cfg: HFData, limit: int | None = None) -> list[Row]:
    """The rows of ``cfg``'s split, loaded from the local cache in offline mode."""
    try:
        import datasets
    except ImportError as err:
        raise DataError(
            "kind = 'hf' needs the `datasets` package: pip install 'nexrl-async[datasets]'"
        ) from err
    if problem := cache_problem(cfg):
        raise DataError(problem)
    cache = datasets_cache(cfg.cache_dir)
    with _offline(datasets):
        try:
            loaded = datasets.load_dataset(
                cfg.dataset, cfg.subset, split=cfg.split, cache_dir=str(cache)
            )
        except (OSError, ValueError) as err:  # ConnectionError, FileNotFoundError are OSErrors
            raise DataError(
                f"cannot load dataset {cfg.dataset!r} from the local cache {cache}: {err}"
            ) from err
    dataset = _one_split(loaded, cfg)
    if limit is not None:
        dataset = dataset.select(range(min(limit, len(dataset))))
    rows: list[Row] = dataset.to_list()
    return rows


def _one_split(loaded: Any, cfg: HFData) -> Any:
    """``load_dataset`` gives a Dataset for a named split, else a DatasetDict of all of them."""
    if cfg.split is not None:
        return loaded
    splits = list(loaded.keys())
    if len(splits) == 1:
        return loaded[splits[0]]
    raise DataError(f"dataset {cfg.dataset!r} has splits {splits}: set split")


@contextmanager
def _offline(datasets: Any) -> Iterator[None]:
    """The ``datasets`` library in offline mode for the duration (then as it was)."""
    config, logging = datasets.config, datasets.utils.logging
    with _OFFLINE_LOCK:
        before, verbosity = config.HF_HUB_OFFLINE, logging.get_verbosity()
        config.HF_HUB_OFFLINE = True
        # its "couldn't be found on the Hub, using the cache" warnings say what is meant here
        logging.set_verbosity(logging.ERROR)
        try:
            yield
        finally:
            config.HF_HUB_OFFLINE = before
            logging.set_verbosity(verbosity)


def describe_hf(cfg: HFData) -> str:
    """What a log line calls the source."""
    subset = f" ({cfg.subset})" if cfg.subset else ""
    split = f"[{cfg.split}]" if cfg.split else ""
    return f"hf dataset {cfg.dataset}{subset}{split} in {Path(datasets_cache(cfg.cache_dir))}"
