"""A generation request as the event loop sees it, and the notifier its readers wait on.

The scheduler is the only writer of a :class:`Request` (always on the event loop); HTTP handlers
read it. Readers never miss an update: they wait for the notifier's version to move past the
last one they saw, so an update that lands while a reader is busy sending is seen next time.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from enum import Enum

import anyio

from nexrl_async.inference.local.sampling import SamplingSpec
from nexrl_async.inference.local.step_plan import (
    FinishReason,
    InputLogprobs,
    LogprobEntry,
    LogprobRequest,
)


class Notifier:
    """A version counter with an awaitable "it moved" signal (its event exists only while
    someone waits: most notifications have no reader)."""

    __slots__ = ("_event", "version")

    def __init__(self) -> None:
        self.version = 0
        self._event: anyio.Event | None = None

    def notify(self) -> None:
        self.version += 1
        if self._event is not None:
            self._event.set()
            self._event = None

    async def wait_past(self, seen: int) -> int:
        """Return once ``version > seen``; returns the new version."""
        while self.version <= seen:
            if self._event is None:
                self._event = anyio.Event()
            await self._event.wait()
        return self.version


class Phase(Enum):
    WAITING = "waiting"
    RUNNING = "running"
    DONE = "done"


@dataclass(eq=False, kw_only=True, slots=True)
class Request:
    """One sequence to generate (one sample of one prompt)."""

    rid: str
    prompt_ids: list[int]
    sampling: SamplingSpec
    logprobs: LogprobRequest = field(default_factory=LogprobRequest)
    stream: bool = False
    stream_interval: int = 1
    notifier: Notifier = field(default_factory=Notifier)
    """Shared by all requests of one HTTP call; notified on every visible change."""
    index: int = 0
    """Position in the HTTP call's result list."""
    created: float = field(default_factory=time.monotonic)

    phase: Phase = Phase.WAITING
    key: int | None = None
    """Row key in the runner while running."""
    output_ids: list[int] = field(default_factory=list)
    output_logprobs: list[LogprobEntry] = field(default_factory=list)
    output_top: list[list[LogprobEntry] | None] = field(default_factory=list)
    output_by_ids: list[list[LogprobEntry] | None] = field(default_factory=list)
    input_logprobs: InputLogprobs | None = None
    text: str = ""
    finish: FinishReason | None = None
    weight_versions: list[dict[str, str | int]] = field(default_factory=list)
    retractions: int = 0
    abort_requested: bool = False
    retract_requested: bool = False
    e2e_latency: float | None = None
    finished_at: float | None = None
    version: int = 0
    """Bumped on every change a reader should see."""
    _done: anyio.Event | None = None

    @property
    def finished(self) -> bool:
        return self.phase is Phase.DONE

    @property
    def done(self) -> anyio.Event:
        """Set once the request has finished (created on first use)."""
        if self._done is None:
            self._done = anyio.Event()
            if self.finished:
                self._done.set()
        return self._done

    @property
    def weight_version(self) -> str | None:
        return str(self.weight_versions[-1]["version"]) if self.weight_versions else None

    def record_token(self, token: int, version: str) -> None:
        position = len(self.output_ids)
        self.output_ids.append(token)
        last = self.weight_versions[-1] if self.weight_versions else None
        if last is not None and last["version"] == version and last["end"] == position:
            last["end"] = position + 1
        else:
            self.weight_versions.append(
                {"version": version, "start": position, "end": position + 1}
            )

    def changed(self) -> None:
        self.version += 1
        self.notifier.notify()

    def complete(self, finish: FinishReason) -> None:
        self.finish = finish
        self.phase = Phase.DONE
        self.finished_at = time.time()
        self.e2e_latency = time.monotonic() - self.created
        if self._done is not None:
            self._done.set()
        self.changed()
