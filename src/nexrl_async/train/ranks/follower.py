"""The loop of every rank but 0: build the same trainer, then run rank 0's commands until told
to stop.

```
groups = init_process_groups(Topology.from_env(), device=..., timeout_s=...)
code = run_follower(cfg, base_dir, groups)      # blocks until Shutdown or a failure
destroy(groups)
sys.exit(code)
```

A follower has no event loop and no control plane: it builds its :class:`Trainer` (sharded like
rank 0's), reports whether that worked, then receives a command, runs it and reports, in the
order rank 0 sends them. It returns 0 after ``Shutdown`` and 1 when any rank failed (its own
error or another's, logged with the failing rank) or rank 0 went away.

While it serves, SIGINT and SIGTERM are ignored (when it runs in the main thread): rank 0
decides when the ranks stop, and on a graceful SIGTERM it still needs every rank for the final
checkpoint. A follower still never outlives rank 0: rank 0's exit closes the connections its
wait is blocked on.
"""

from __future__ import annotations

import signal
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from loguru import logger

from nexrl_async.config.schema import RecipeConfig
from nexrl_async.train.ranks.commands import (
    RankChannel,
    RankFailure,
    RankHooks,
    Shutdown,
    build_on_every_rank,
    describe,
    execute,
    is_secondary,
)
from nexrl_async.train.ranks.topology import ProcessGroups
from nexrl_async.train.spec import TrainerSpec

EXIT_OK = 0
EXIT_FAILED = 1


def run_follower(
    cfg: RecipeConfig,
    base_dir: Path,
    groups: ProcessGroups,
    *,
    hooks: RankHooks | None = None,
) -> int:
    """Serve rank 0's commands on this rank until ``Shutdown`` (0) or a failure (1).

    Args:
        cfg: the recipe (the same one rank 0 runs).
        base_dir: the recipe's folder (user code such as ``prepare_batch`` is loaded from it).
        groups: this rank's process groups (world size > 1, rank != 0).
        hooks: the same checkpoint hooks rank 0's trainer was given; ``sync_weights`` may
            consume the gathered weights here too (by default they are discarded).
    """
    with _rank0_owns_signals():
        return _serve(cfg, base_dir, groups, hooks or RankHooks())


def _serve(cfg: RecipeConfig, base_dir: Path, groups: ProcessGroups, hooks: RankHooks) -> int:
    channel = RankChannel(groups)
    rank = groups.rank
    try:
        trainer = build_on_every_rank(TrainerSpec.from_recipe(cfg, base_dir), channel)
    except RankFailure as err:
        logger.error("rank {}: stopping: {}", rank, err)
        return EXIT_FAILED
    while True:
        try:
            command = channel.receive()
        except RankFailure as err:
            logger.error("rank {}: stopping: {}", rank, err)
            return EXIT_FAILED
        if isinstance(command, Shutdown):
            logger.debug("rank {}: shutdown ({})", rank, command.reason or "no reason given")
            return EXIT_OK
        error: Exception | None = None
        try:
            execute(trainer, command, hooks)
        except Exception as err:  # noqa: BLE001 - reported to every rank
            log = logger.warning if is_secondary(err) else logger.error
            log("rank {}: {} failed: {!r}", rank, describe(command), err)
            error = err
        try:
            channel.agree(error, what=describe(command))
        except RankFailure as err:
            logger.error("rank {}: stopping: {}", rank, err)
            return EXIT_FAILED


@contextmanager
def _rank0_owns_signals() -> Iterator[None]:
    """Ignore SIGINT and SIGTERM meanwhile (only possible in the main thread)."""
    previous = {}
    for signum in (signal.SIGINT, signal.SIGTERM):
        try:
            previous[signum] = signal.signal(signum, signal.SIG_IGN)
        except ValueError:  # not the main thread: leave the handlers alone
            break
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
