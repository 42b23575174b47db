"""Rank 0's handle on the trainers of all ranks, and the factory that picks it.

```
groups = init_process_groups(Topology.from_env(), device=..., timeout_s=...)
trainer = make_trainer(spec, groups)            # Trainer (world size 1) or DistributedTrainer
metrics = trainer.step(batch)                   # rank 0 broadcasts TrainStep, then trains its share
trainer.save_hf(path)                           # every rank gathers, rank 0 writes
trainer.shutdown()                              # followers leave their loop
destroy(groups)
```

Both implement :class:`nexrl_async.core.protocols.PolicyTrainer`: each call of a
:class:`DistributedTrainer` broadcasts the matching command
(:mod:`~nexrl_async.train.ranks.commands`), runs rank 0's part, and exchanges every rank's
status, so a failure on any rank raises a
:class:`~nexrl_async.train.ranks.commands.RankFailure` here.

After a failure every follower has left its loop, and every later call raises
:class:`TrainError` at once. Calls are serialised (one command at a time, whatever thread
calls); like the trainer, call it from a worker thread, never on the event loop.

It deliberately has no ``optimizer``/``scheduler``: ``train.checkpoint.save_trainer`` on rank 0
alone would start collectives the followers never join. Checkpoint through
:meth:`DistributedTrainer.save_checkpoint`; rank 0's own trainer is ``.trainer``.
"""

from __future__ import annotations

import threading
from collections.abc import Generator, Iterator
from contextlib import contextmanager
from typing import Any

from loguru import logger
from torch import Tensor

from nexrl_async.core.errors import TrainError
from nexrl_async.train.ranks.commands import (
    Command,
    CommandCalls,
    RankChannel,
    RankFailure,
    RankHooks,
    Shutdown,
    SyncWeights,
    build_on_every_rank,
    describe,
    drain,
    execute,
)
from nexrl_async.train.ranks.topology import ProcessGroups, status_timeout_s
from nexrl_async.train.spec import TrainerSpec
from nexrl_async.train.trainer import Trainer


class DistributedTrainer(CommandCalls):
    """Rank 0's trainer at world size > 1: every call runs on every rank.

    Args:
        trainer: rank 0's own (sharded) trainer.
        channel: the command/status channel to the followers.
        hooks: checkpoint hooks (the followers must be given the same ones).
        busy_timeout_s: how long a call waits for the one before it (e.g. a weight sync still
            being consumed) before failing with :class:`TrainError`.
    """

    def __init__(
        self,
        trainer: Trainer,
        channel: RankChannel,
        hooks: RankHooks | None = None,
        *,
        busy_timeout_s: float = 3600.0,
    ) -> None:
        self.trainer = trainer
        self.channel = channel
        self.hooks = hooks or RankHooks()
        self.tokenizer: Any = trainer.tokenizer
        self.model = trainer.model
        self.busy_timeout_s = busy_timeout_s
        # a plain Lock (not an RLock): a weight sync takes it in one worker thread and may
        # release it in another, whichever advances the stream last
        self._lock = threading.Lock()
        self._failure: TrainError | None = None
        self._closed = False

    @property
    def world_size(self) -> int:
        return self.channel.groups.world_size

    @property
    def steps_done(self) -> int:
        return self.trainer.steps_done

    @property
    def context_length(self) -> int | None:
        return self.trainer.context_length

    def named_parameters_for_sync(self) -> Generator[tuple[str, Tensor], None, None]:
        """``(HF name, full tensor)`` per parameter, gathered from the shards one at a time.

        Nothing happens until the first item is asked for. Every rank takes part in each
        gather, so then iterate it to the end, or close it (``contextlib.closing``; dropping
        the last reference closes it too): closing drains the remaining gathers and exchanges
        the ranks' status. Other calls wait until then (up to ``busy_timeout_s``). Tensors are
        on rank 0's training device.
        """
        self._take()
        try:
            self._check_open()
            self._send(SyncWeights())
        except BaseException:
            self._lock.release()
            raise
        params = self.trainer.named_parameters_for_sync()
        error: Exception | None = None
        try:
            # not ``yield from``: closing this stream must not close ``params`` (drained below)
            for item in params:  # noqa: UP028 - see above
                yield item
        except Exception as err:
            error = err
            raise
        finally:
            try:
                if error is None:
                    error = _drained(params)
                self._agree(error, what="sync_weights")
            finally:
                self._lock.release()

    def shutdown(self, reason: str = "") -> None:
        """Tell the followers to leave their loop (idempotent; a no-op after a failure)."""
        with self._exclusive():
            if self._closed or self._failure is not None:
                return
            self._closed = True
            try:
                self.channel.send(Shutdown(reason=reason))
            except RankFailure as err:
                logger.warning("shutdown could not reach the followers: {}", err)

    # ---- internals ----------------------------------------------------------------------------

    def _run(self, command: Command) -> object:
        with self._exclusive():
            self._check_open()
            self._send(command)
            error: Exception | None = None
            result = None
            try:
                result = execute(self.trainer, command, self.hooks)
            except Exception as err:  # noqa: BLE001 - reported to every rank, then re-raised
                error = err
            self._agree(error, what=describe(command))
            return result

    def _check_open(self) -> None:
        if self._failure is not None:
            raise TrainError(f"the training ranks stopped after a failure: {self._failure}")
        if self._closed:
            raise TrainError("the distributed trainer was shut down")

    def _take(self) -> None:
        if not self._lock.acquire(timeout=self.busy_timeout_s):
            raise TrainError(
                f"the training ranks stayed busy for {self.busy_timeout_s:.0f} s "
                "(a weight sync that was never finished or closed?)"
            )

    @contextmanager
    def _exclusive(self) -> Iterator[None]:
        self._take()
        try:
            yield
        finally:
            self._lock.release()

    def _send(self, command: Command) -> None:
        try:
            self.channel.send(command)
        except RankFailure as err:
            self._failure = err
            raise

    def _agree(self, error: Exception | None, *, what: str) -> None:
        try:
            self.channel.agree(error, what=what)
        except RankFailure as err:
            self._failure = err
            raise


def _drained(params: Iterator[tuple[str, Tensor]]) -> Exception | None:
    try:
        drain(params)
    except Exception as err:  # noqa: BLE001 - reported to every rank
        return err
    return None


def make_trainer(
    spec: TrainerSpec, groups: ProcessGroups, *, hooks: RankHooks | None = None
) -> Trainer | DistributedTrainer:
    """The trainer the engine drives on rank 0: a plain :class:`Trainer` at world size 1, else
    a :class:`DistributedTrainer` (the followers build theirs in :func:`run_follower` at the
    same time; building waits until every rank has built its trainer or one failed).

    Raises:
        TrainError: called on a rank other than 0, or some rank failed to build its trainer
            (a :class:`RankFailure` naming it).
    """
    if not groups.distributed:
        return Trainer.from_spec(spec, groups=groups)
    if not groups.topology.is_main:
        raise TrainError(f"make_trainer runs on rank 0; rank {groups.rank} runs run_follower")
    channel = RankChannel(groups)
    trainer = build_on_every_rank(spec, channel)
    timeout_s = status_timeout_s(spec.trainer)
    return DistributedTrainer(trainer, channel, hooks, busy_timeout_s=timeout_s)
