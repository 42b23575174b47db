"""The scheduler: continuous batching on the event loop, model work on one torch thread.

``run()`` loops: build a :class:`StepPlan` from the queues (drop aborted / retracted rows, admit
waiting requests up to ``max_batch``, decode the rest), run it with
``anyio.to_thread.run_sync(runner.step, limiter=<1>)``, and apply the result to the requests.
It sleeps on ``_wake`` when there is nothing to do. Requests that arrive while a step runs are
admitted by the next step, so concurrent requests share every forward pass.

Control (SGLang semantics, docs/sglang_api.md §4.1): new requests wait at the gate while paused or
while a weight update waits for the running ones to drain; ``pause("abort")`` aborts everything
and returns once nothing is left, ``"retract"`` moves running rows back to the queue (their
prefix is recomputed on continue), ``"in_place"`` just stops stepping. Weight swaps run under the
same limiter, so they always land between two steps.
"""

from __future__ import annotations

import itertools
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import anyio
import anyio.to_thread
import torch
from anyio.abc import TaskStatus
from loguru import logger

from nexrl_async.core.errors import EngineUnavailable, RequestRejected, WeightSyncError
from nexrl_async.inference.local.request import Notifier, Phase, Request
from nexrl_async.inference.local.runner import ModelRunner
from nexrl_async.inference.local.step_plan import Admission, StepPlan, StepResult, finish_abort
from nexrl_async.inference.staging import Layout, StagingReader

PauseMode = Literal["abort", "retract", "in_place"]

INLINE_LOAD_BYTES = 64 << 20
"""Shared-memory loads up to this size copy in the event loop (a few ms at most), larger ones
in a worker thread (the loop keeps answering meanwhile)."""


@dataclass
class Stats:
    """Counters exposed in ``/server_info`` (``internal_states[0]``)."""

    steps: int = 0
    generated_tokens: int = 0
    max_batch_size: int = 0
    batch_sizes: Counter[int] | None = None

    def record(self, result: StepResult) -> None:
        if result.batch_size == 0:
            return
        self.steps += 1
        self.generated_tokens += sum(1 for o in result.outputs if o.token is not None)
        self.max_batch_size = max(self.max_batch_size, result.batch_size)
        if self.batch_sizes is None:
            self.batch_sizes = Counter()
        self.batch_sizes[result.batch_size] += 1


class Scheduler:
    """Owns the queues and every :class:`Request` between submission and completion."""

    def __init__(
        self, runner: ModelRunner, *, max_batch: int, model_path: str, weight_version: str
    ) -> None:
        self._runner = runner
        self._max_batch = max_batch
        self._limiter = anyio.CapacityLimiter(1)
        self._waiting: deque[Request] = deque()
        self._running: dict[int, Request] = {}
        self._live: dict[str, Request] = {}
        self._keys = itertools.count()
        self._wake = anyio.Event()
        self._changed = Notifier()
        self._update_lock = anyio.Lock()
        self._updating = False
        self._closed = False
        self._in_step = False
        self.paused: PauseMode | None = None
        self.model_path = model_path
        self.weight_version = weight_version
        self.stats = Stats()
        self._staging = StagingReader()

    # ---- loop -------------------------------------------------------------------------------
    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Step until cancelled. A failing step fails the server (the task group ends)."""
        task_status.started()
        while True:
            plan = self._plan()
            if plan is None:
                await self._wake.wait()
                self._wake = anyio.Event()
                continue
            self._in_step = True
            try:
                result = await anyio.to_thread.run_sync(
                    self._runner.step, plan, limiter=self._limiter
                )
            finally:
                self._in_step = False
            self._apply(result)

    def _poke(self) -> None:
        self._wake.set()

    def _plan(self) -> StepPlan | None:
        drop = [
            key
            for key, req in self._running.items()
            if req.abort_requested or req.retract_requested
        ]
        if self.paused is not None:
            return StepPlan(drop=drop, decode=False) if drop else None
        admit = []
        room = self._max_batch - (len(self._running) - len(drop))
        while self._waiting and room > 0:
            req = self._waiting.popleft()
            req.key = next(self._keys)
            req.phase = Phase.RUNNING
            self._running[req.key] = req
            admit.append(self._admission(req))
            room -= 1
        if not drop and not admit and not self._running:
            return None
        return StepPlan(drop=drop, admit=admit, decode=True)

    @staticmethod
    def _admission(req: Request) -> Admission:
        assert req.key is not None
        return Admission(
            key=req.key,
            prompt_ids=req.prompt_ids,
            output_ids=list(req.output_ids),
            sampling=req.sampling,
            logprobs=req.logprobs,
            wants_text=req.stream,
        )

    def _apply(self, result: StepResult) -> None:
        self.stats.record(result)
        for key, text in result.dropped_text.items():
            req = self._running.pop(key)
            req.key, req.text = None, text
            if req.abort_requested:
                self._complete(req, finish_abort())
            else:
                req.retract_requested = False
                req.retractions += 1
                req.phase = Phase.WAITING
                self._waiting.appendleft(req)
        for out in result.outputs:
            req = self._running[out.key]
            if out.input_logprobs is not None:
                req.input_logprobs = out.input_logprobs
            if out.token is not None:
                req.record_token(out.token, result.weight_version)
                if req.logprobs.enabled:
                    req.output_logprobs.append((out.logprob, out.token))
                    req.output_top.append(out.top)
                    req.output_by_ids.append(out.by_ids)
            if out.text is not None:
                req.text = out.text
            if out.finish is not None:
                del self._running[out.key]
                self._complete(req, out.finish)
            elif req.stream and len(req.output_ids) % req.stream_interval == 0:
                req.changed()
        self._changed.notify()

    def _complete(self, req: Request, finish: dict[str, Any]) -> None:
        req.key = None
        self._live.pop(req.rid, None)
        req.complete(finish)

    # ---- requests ---------------------------------------------------------------------------
    @property
    def accepting(self) -> bool:
        return self.paused is None and not self._updating

    async def submit(self, requests: list[Request]) -> None:
        """Queue ``requests`` once the gate is open (blocks while paused / updating)."""
        while not self.accepting and not self._closed:
            await self._changed.wait_past(self._changed.version)
        if self._closed:
            raise EngineUnavailable("the server is shutting down")
        seen: set[str] = set()
        for req in requests:
            if req.rid in self._live or req.rid in seen:
                raise RequestRejected(400, f"Duplicate request ID detected: {req.rid}")
            seen.add(req.rid)
        for req in requests:
            self._live[req.rid] = req
            self._waiting.append(req)
        self._poke()

    def abort(self, rid: str | None) -> int:
        """Abort one request by exact rid, or all (``rid is None``); returns how many."""
        if rid is None:
            targets = list(self._live.values())
        else:
            targets = [self._live[rid]] if rid in self._live else []
        for req in targets:
            if req.phase is Phase.WAITING:
                self._waiting.remove(req)
                self._complete(req, finish_abort(waiting=True))
            elif req.phase is Phase.RUNNING:
                req.abort_requested = True
        if targets:
            self._changed.notify()
            self._poke()
        return len(targets)

    async def wait_until(self, done: Callable[[], bool], timeout_s: float) -> bool:
        """Wait (on scheduler progress) until ``done()``; False on timeout."""
        with anyio.move_on_after(timeout_s):
            while not done():
                await self._changed.wait_past(self._changed.version)
            return True
        return False

    @property
    def idle(self) -> bool:
        return not self._running and not self._waiting

    @property
    def loads(self) -> dict[str, int]:
        return {"num_running_reqs": len(self._running), "num_waiting_reqs": len(self._waiting)}

    # ---- control ----------------------------------------------------------------------------
    async def pause(self, mode: PauseMode, *, timeout_s: float = 60.0) -> None:
        self.paused = mode
        self._changed.notify()
        if mode == "abort":
            self.abort(None)
            await self.wait_until(lambda: self.idle, timeout_s)
        elif mode == "retract":
            for req in self._running.values():
                req.retract_requested = True
            self._poke()
            await self.wait_until(lambda: not self._running, timeout_s)
        else:  # in place: return once the step in flight (if any) has been applied
            await self.wait_until(lambda: not self._in_step, timeout_s)
        logger.info("generation paused ({})", mode)

    def resume(self) -> None:
        self.paused = None
        self._changed.notify()
        self._poke()
        logger.info("generation continued")

    def cache_flushable(self) -> bool:
        """SGLang flushes only when idle: nothing running and (unless paused) nothing waiting."""
        return not self._running and (self.paused is not None or not self._waiting)

    async def update_weights(
        self, model_path: str, version: str | None, *, abort_all: bool, flush_cache: bool
    ) -> tuple[bool, str]:
        """Swap weights from ``model_path`` between two steps; SGLang's (success, message)."""

        def loaded() -> None:
            self.model_path = model_path

        return await self._swap(
            lambda: self._runner.load_weights(Path(model_path), version),
            version,
            abort_all=abort_all,
            flush_cache=flush_cache,
            failure="Failed to update weights: {}",
            success="Succeeded to update model weights.",
            loaded=loaded,
        )

    async def update_tensors(
        self,
        tensors: dict[str, torch.Tensor],
        version: str | None,
        *,
        abort_all: bool,
        flush_cache: bool,
    ) -> tuple[bool, str]:
        """Load received tensors (a subset of the weights) between two steps."""
        return await self._swap(
            lambda: self._runner.load_tensors(tensors, version),
            version,
            abort_all=abort_all,
            flush_cache=flush_cache,
            failure="Failed to update parameter online: {}",
            success="Succeeded to update parameter online.",
        )

    async def update_from_staging(
        self, layout: Layout, version: str | None, *, in_place: bool
    ) -> tuple[bool, str]:
        """Swap in every weight of a shared-memory staging file (inference/staging.py) between
        two steps. In place, running requests go on with the new weights (nothing paused or
        waited for: the copy is one step of the loop); otherwise as the other updates."""

        def load() -> int:
            try:
                views = self._staging.views(layout)
            except (OSError, ValueError) as err:
                self._staging.close()
                raise WeightSyncError(f"cannot read staging file {layout.path}: {err}") from err
            return self._runner.swap_tensors(dict(views), version)

        return await self._swap(
            load, version, abort_all=False, flush_cache=False, wait_idle=not in_place,
            inline=layout.size <= INLINE_LOAD_BYTES,
            failure="Failed to update weights from shared memory: {}",
            success="Succeeded to update model weights.",
        )  # fmt: skip

    async def _swap(
        self,
        load: Callable[[], int],
        version: str | None,
        *,
        abort_all: bool,
        flush_cache: bool,
        failure: str,
        success: str,
        loaded: Callable[[], None] | None = None,
        wait_idle: bool = True,
        inline: bool = False,
    ) -> tuple[bool, str]:
        """Run ``load`` under the step limiter once the running requests are gone (or paused;
        at once without ``wait_idle``), then ``loaded``; SGLang's (success, message). New
        requests wait at the gate meanwhile. ``inline``: in the event loop, not a worker thread
        (a small copy: the answer leaves before the next step's thread competes for the GIL)."""
        async with self._update_lock:
            self._updating = True
            self._changed.notify()
            try:
                if abort_all:
                    self.abort(None)
                while wait_idle and self.paused is None and not self.idle:
                    await self._changed.wait_past(self._changed.version)
                try:
                    if inline:
                        async with self._limiter:
                            count = load()
                    else:
                        count = await anyio.to_thread.run_sync(load, limiter=self._limiter)
                except WeightSyncError as err:
                    return False, failure.format(err)
                if loaded is not None:
                    loaded()
                if version is not None:
                    self.weight_version = version
                logger.info("weights updated: {} tensors (version {})", count, self.weight_version)
                if flush_cache and not self.cache_flushable():
                    return False, (
                        "Weights were updated, but the cache was not flushed because requests "
                        "are still running or queued."
                    )
                return True, success
            finally:
                self._updating = False
                self._changed.notify()
                self._poke()

    def close(self) -> None:
        """Stop accepting (waiters at the gate get 503) and abort everything in flight."""
        self._closed = True
        self.abort(None)
        self._changed.notify()
