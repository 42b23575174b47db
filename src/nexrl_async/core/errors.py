"""The one exception tree of nexrl_async.

Everything the engine raises on purpose derives from :class:`NexRLError`. Foreign exceptions are
wrapped at the boundary with ``raise ... from err`` so callers catch one family.

```
NexRLError
├── ConfigError            bad recipe, override or CLI usage (exit code 2)
├── UserCodeError          a ``file.py:Name`` reference that cannot be loaded
├── DataError              a data source that cannot be read, or a row that is malformed
├── InferenceError
│   ├── RequestRejected    4xx from the server: not retryable, carries the server's message
│   ├── EngineUnavailable  transport errors / 502 / 503 / 504 after the retry budget
│   └── GenerationError    truncated or garbled stream, SSE error event, bad payload
├── WeightSyncError        a publication step failed or timed out
├── RolloutError           agent loop or evaluator failure (caught at the per-sample boundary)
├── TrainError             trainer step or rank-protocol failure
├── CheckpointError        save / load / resume failure
└── CallbackError          a Python API callback raised (the run was stopped gracefully first)
```
"""

from __future__ import annotations


class NexRLError(Exception):
    """Base of every error nexrl_async raises on purpose."""


class ConfigError(NexRLError):
    """A recipe, override or CLI argument is invalid.

    The message is one line naming the file, the dotted path, the bad value and what was
    expected, e.g. ``recipe.toml: rollout.workers = -1: expected an integer >= 1``.
    """

    def __init__(
        self,
        message: str,
        *,
        file: str | None = None,
        path: str | None = None,
    ) -> None:
        self.file = file
        self.path = path
        prefix = ""
        if file:
            prefix = f"{file}: "
        super().__init__(f"{prefix}{message}")


class UserCodeError(NexRLError):
    """A ``file.py:Name`` reference could not be resolved or imported."""


class DataError(NexRLError):
    """A data source cannot be read, or one of its rows is malformed."""


class InferenceError(NexRLError):
    """Base of errors talking to an inference server."""

    retryable: bool = False


class RequestRejected(InferenceError):
    """The server rejected the request (HTTP 4xx). Not retryable; ``message`` is the server's."""

    def __init__(self, status_code: int, message: str, *, url: str = "") -> None:
        self.status_code = status_code
        self.message = message
        self.url = url
        where = f" from {url}" if url else ""
        super().__init__(f"HTTP {status_code}{where}: {message}")


class EngineUnavailable(InferenceError):
    """The server could not be reached (transport error, 502/503/504) within the retry budget."""

    retryable = True


class GenerationError(InferenceError):
    """A response stream was truncated, garbled, or carried an error event."""


class WeightSyncError(NexRLError):
    """A weight publication step failed or timed out."""


class RolloutError(NexRLError):
    """A failure inside the agent loop or the evaluator."""


class TrainError(NexRLError):
    """A trainer step failed, on any rank."""


class CheckpointError(NexRLError):
    """Saving, loading or resuming a checkpoint failed."""


class CallbackError(NexRLError):
    """A callback given to ``nexrl_async.train`` raised; the run was stopped gracefully first
    (the callback's exception is the ``__cause__``)."""
