"""The state machine behind the simulated SGLang server: requests, tokens, time, pause, updates.

Every request (one sample) has a token schedule: the first token is due ``prefill_latency_s +
token_latency_s`` after admission, the next ones every ``token_latency_s``. A request's output
is a deterministic function of (server seed, prompt ids, ``sampling_seed``, the sample's position
in its request), so the samples of one request differ even when their prompts are equal: its
natural length is drawn from a log-normal distribution (long tail), it ends with the EOS token
unless ``ignore_eos``, is cut at ``max_new_tokens``, and stops early on ``stop_token_ids``.
Concurrent requests are independent (each HTTP request drives its own samples), so timing is
honest: N requests of L tokens at latency d each take about ``L * d`` wall time together.

Server-wide behaviour follows docs/sglang_api.md §4.1: new requests block while paused or while a
weight update waits; a weight update that is not paused waits for running requests to finish
(unless it aborts them); ``pause_generation`` ``abort`` ends running requests with an abort
finish, ``retract``/``in_place`` freeze them. Every emitted token records the weight version
that produced it.

No anyio primitive is created before the first request, so the engine can be built outside an
event loop.
"""

from __future__ import annotations

import array
import hashlib
import math
import random
from collections import deque
from collections.abc import AsyncGenerator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import anyio
import anyio.lowlevel
from msgspec import Struct

from nexrl_async.testing.simulated_config import SimulatedConfig

PauseState = Literal["running", "abort", "retract", "in_place"]


@dataclass
class Faults:
    """Injected failures; each counter is consumed by the next matching request."""

    fail_generate: int = 0
    """Next ``/generate`` requests answered with ``fail_status`` (503 by default)."""
    fail_status: int = 503
    stream_errors: int = 0
    """Next streams that send an SSE error event after ``error_after_tokens`` tokens."""
    error_after_tokens: int = 1
    truncations: int = 0
    """Next streams cut (no finish, no ``[DONE]``) after ``truncate_after_tokens`` tokens."""
    truncate_after_tokens: int = 1
    garbles: int = 0
    """Next streams whose second event is not valid JSON."""
    weight_update_failures: int = 0
    """Next weight updates answered ``success: false``."""
    unhealthy: bool = False
    """``/health`` and ``/health_generate`` answer 503."""

    def take(self, name: str) -> bool:
        """Consume one unit of counter ``name``; True when there was one."""
        count: int = getattr(self, name)
        if count <= 0:
            return False
        setattr(self, name, count - 1)
        return True


@dataclass
class Stats:
    """What the server saw, for tests and benchmarks."""

    generate_requests: int = 0
    finished: int = 0
    aborted: int = 0
    abort_calls: deque[dict[str, Any]] = field(default_factory=lambda: deque(maxlen=4096))
    """The last 4096 ``/abort_request`` bodies."""
    pauses: deque[str] = field(default_factory=lambda: deque(maxlen=4096))
    continues: int = 0
    flushes: int = 0
    weight_updates: deque[dict[str, Any]] = field(default_factory=lambda: deque(maxlen=4096))
    bodies: deque[dict[str, Any]] = field(default_factory=lambda: deque(maxlen=256))
    """The last 256 ``/generate`` bodies (as decoded JSON)."""

    def summary(self) -> dict[str, Any]:
        """JSON-ready counters and recent records (``bodies`` as a count)."""
        return {
            "generate_requests": self.generate_requests,
            "finished": self.finished,
            "aborted": self.aborted,
            "abort_calls": list(self.abort_calls),
            "pauses": list(self.pauses),
            "continues": self.continues,
            "flushes": self.flushes,
            "weight_updates": list(self.weight_updates),
            "bodies": len(self.bodies),
        }


class SamplingSpec(Struct, frozen=True, kw_only=True):
    """The sampling keys the simulator acts on (validated by the routes)."""

    max_new_tokens: int = 128
    min_new_tokens: int = 0
    ignore_eos: bool = False
    stop_token_ids: frozenset[int] = frozenset()
    sampling_seed: int | None = None


class SimRequest:
    """One sample in flight: its plan, its output so far and how it finished."""

    def __init__(
        self,
        config: SimulatedConfig,
        *,
        rid: str,
        prompt: Sequence[int],
        sampling: SamplingSpec,
        sample_index: int = 0,
    ) -> None:
        self.rid = rid
        self.prompt_tokens = len(prompt)
        self.sampling = sampling
        self._config = config
        self._rng = random.Random(_plan_seed(config.seed, prompt, sampling, sample_index))
        median = max(config.mean_output_tokens, 1.0)
        drawn = self._rng.lognormvariate(math.log(median), config.output_tokens_sigma)
        self.natural_length = max(1, sampling.min_new_tokens + 1, round(drawn))
        self.output_ids: list[int] = []
        self.logprobs: list[float] = []
        self.versions: list[str] = []
        self.finish: dict[str, Any] | None = None
        self.abort_message: str | None = None
        self.admitted = False
        self.next_due = 0.0
        self.chunk_start = 0
        self.reported = 0
        self.final_reported = False
        self.started_at = 0.0

    @property
    def done(self) -> bool:
        return self.finish is not None

    def start(self, now: float) -> None:
        self.admitted = True
        self.started_at = now
        self.next_due = now + self._config.prefill_latency_s + self._config.token_latency_s
        if self.sampling.max_new_tokens == 0:
            self.finish = {"type": "length", "length": 0}

    def emit(self, version: str) -> None:
        """Produce the next token (under weight ``version``) and decide whether it ends."""
        eos = self._config.eos_token_id
        position = len(self.output_ids)
        if not self.sampling.ignore_eos and position == self.natural_length - 1:
            token = eos
        else:
            token = self._rng.randrange(self._config.vocab_size - 1)
            token += token >= eos
        self.output_ids.append(token)
        self.logprobs.append(-self._rng.expovariate(1.5))
        self.versions.append(version)
        self.next_due += self._config.token_latency_s
        natural_end = token == eos and not self.sampling.ignore_eos
        if natural_end or token in self.sampling.stop_token_ids:
            self.finish = {"type": "stop", "matched": token}
        elif len(self.output_ids) >= self.sampling.max_new_tokens:
            self.finish = {"type": "length", "length": self.sampling.max_new_tokens}

    def end_aborted(self) -> None:
        message = self.abort_message or "Aborted"
        if not self.admitted:
            message = "Abort in waiting queue"
        self.finish = {"type": "abort", "message": message, "status_code": None, "err_type": None}

    def version_spans(self) -> list[dict[str, Any]]:
        """SGLang's ``weight_versions``: ``{version, start, end}`` over output positions."""
        spans: list[dict[str, Any]] = []
        for i, version in enumerate(self.versions):
            if spans and spans[-1]["version"] == version:
                spans[-1]["end"] = i + 1
            else:
                spans.append({"version": version, "start": i, "end": i + 1})
        return spans


def _plan_seed(seed: int, prompt: Sequence[int], sampling: SamplingSpec, index: int) -> int:
    digest = hashlib.blake2b(digest_size=8)
    digest.update(array.array("q", [seed, sampling.sampling_seed or 0, index]).tobytes())
    digest.update(array.array("q", prompt).tobytes())
    return int.from_bytes(digest.digest(), "little")


class SimulatedEngine:
    """Server-wide state of the simulated SGLang server (one per app)."""

    def __init__(self, config: SimulatedConfig) -> None:
        self.config = config
        self.faults = Faults()
        self.stats = Stats()
        self.weight_version = config.weight_version
        self.model_path = config.model_path
        self.pause: PauseState = "running"
        self.requests: dict[str, SimRequest] = {}
        self.groups: dict[str, int] = {}
        self.session_open = False
        self.released_tags: set[str] = set()
        self._updates_waiting = 0
        self._events: dict[bool, anyio.Event] = {}
        """Wake-up events: ``True`` for request loops, ``False`` for control waiters."""

    # ------------------------------------------------------------------ wake-ups

    def notify(self) -> None:
        """Wake request loops and control waiters: pause, abort, continue, update."""
        self._wake(requests=True)
        self._wake(requests=False)

    def notify_control(self) -> None:
        """Wake only control waiters (a request ended): request loops need not recompute."""
        self._wake(requests=False)

    def _wake(self, *, requests: bool) -> None:
        event = self._events.pop(requests, None)
        if event is not None:
            event.set()

    async def wait_change(self, timeout_s: float | None, *, control: bool = False) -> None:
        """Sleep until the next notification (``control``: also when a request ends) or
        ``timeout_s`` (None: no timeout)."""
        event = self._events.get(not control)
        if event is None:
            event = self._events[not control] = anyio.Event()
        with anyio.move_on_after(math.inf if timeout_s is None else timeout_s):
            await event.wait()

    # ------------------------------------------------------------------ requests

    def register(self, reqs: Sequence[SimRequest]) -> str | None:
        """Add requests; returns the duplicate rid instead when one is already in flight."""
        seen: set[str] = set()
        for req in reqs:
            if req.rid in self.requests or req.rid in seen:
                return req.rid
            seen.add(req.rid)
        for req in reqs:
            self.requests[req.rid] = req
        self.stats.generate_requests += 1
        return None

    def release(self, reqs: Sequence[SimRequest]) -> None:
        for req in reqs:
            if self.requests.get(req.rid) is req:
                del self.requests[req.rid]
                self.stats.finished += 1
                self.stats.aborted += bool(req.finish and req.finish["type"] == "abort")
        self.notify_control()

    def running(self) -> list[SimRequest]:
        """Admitted requests that have not finished (they hold SGLang's reader lock)."""
        return [r for r in self.requests.values() if r.admitted and not r.done]

    async def run(
        self, reqs: Sequence[SimRequest], *, interval: int | None
    ) -> AsyncGenerator[list[int], None]:
        """Drive ``reqs`` to their end; yields the indices of samples with a chunk to send.

        With ``interval`` (streaming) a sample is reported every ``interval`` new tokens and at
        its end (its ``chunk_start``/``reported`` cursors bound the chunk); without, once when
        every sample has finished. Between a state check and a wait there is no await, so no
        :meth:`notify` is missed.
        """
        await self._admit(reqs)
        was_frozen = False
        while True:
            frozen = self.pause in ("retract", "in_place")
            if was_frozen and not frozen:
                resumed = anyio.current_time() + self.config.token_latency_s
                for req in reqs:
                    req.next_due = resumed
            was_frozen = frozen
            ready = self._advance(reqs, interval, frozen=frozen)
            finished = all(r.done for r in reqs)
            if interval is None and finished:
                yield list(range(len(reqs)))
                return
            if interval is not None and ready:
                yield ready
                if finished:
                    return
                continue
            if frozen:
                await self.wait_change(None)
                continue
            delay = min(r.next_due for r in reqs if not r.done) - anyio.current_time()
            if delay > 0:
                await self.wait_change(delay)
            else:
                await anyio.lowlevel.checkpoint()

    def _advance(
        self, reqs: Sequence[SimRequest], interval: int | None, *, frozen: bool
    ) -> list[int]:
        """Emit every due token (at most ``interval`` per sample); returns the samples to report."""
        now = anyio.current_time()
        ready: list[int] = []
        for i, req in enumerate(reqs):
            if req.final_reported:
                continue
            if req.done:
                pass
            elif req.abort_message is not None:
                req.end_aborted()
            elif not frozen:
                produced = 0
                while not req.done and req.next_due <= now:
                    req.emit(self.weight_version)
                    produced += 1
                    if interval is not None and produced >= interval:
                        break
            unreported = len(req.output_ids) - req.reported
            if req.done or (interval is not None and unreported >= interval):
                req.chunk_start, req.reported = req.reported, len(req.output_ids)
                req.final_reported = req.done
                ready.append(i)
        return ready

    async def _admit(self, reqs: Sequence[SimRequest]) -> None:
        """Block while paused or while a weight update waits (SGLang's pause gate / lock)."""
        while self.pause != "running" or self._updates_waiting:
            if all(r.abort_message is not None for r in reqs):
                break
            await self.wait_change(None)
        now = anyio.current_time()
        for req in reqs:
            if req.abort_message is not None:
                req.end_aborted()
            else:
                req.start(now)

    # ------------------------------------------------------------------ control

    def abort(self, rid: str = "", *, abort_all: bool = False, message: str = "Aborted") -> int:
        """Mark matching requests aborted; returns how many."""
        hits = [r for r in self.requests.values() if abort_all or r.rid == rid]
        for req in hits:
            if not req.done and req.abort_message is None:
                req.abort_message = message
        self.notify()
        return len(hits)

    async def pause_generation(self, mode: PauseState) -> None:
        """Pause; in ``abort`` mode return once no running request is left."""
        self.pause = mode
        self.stats.pauses.append(mode)
        if mode == "abort":
            for req in self.running():
                req.abort_message = "Aborted"
        self.notify()
        while mode == "abort" and self.running():
            await self.wait_change(None, control=True)

    def continue_generation(self) -> None:
        self.pause = "running"
        self.stats.continues += 1
        self.notify()

    def can_flush(self) -> bool:
        """SGLang flushes only an idle scheduler; a ``retract`` pause requeues the running
        requests (their KV is freed), so flushing is allowed then. Requests blocked at the
        pause gate are not in the scheduler yet and do not count."""
        return self.pause == "retract" or not self.running()

    async def acquire_update(self, *, abort_all: bool) -> None:
        """Wait like SGLang's writer lock: paused → at once; else until running requests end."""
        if abort_all:
            self.abort(abort_all=True)
        if self.pause != "running":
            return
        self._updates_waiting += 1
        try:
            while self.running():
                await self.wait_change(None, control=True)
        finally:
            self._updates_waiting -= 1
            self.notify()

    def set_weights(self, *, model_path: str | None, version: str | None) -> None:
        if model_path is not None:
            self.model_path = model_path
        if version is not None:
            self.weight_version = version
        self.notify()
