"""How a process ends when its native state cannot be torn down safely.

A gloo collective that timed out leaves the transport with an operation that never completes;
the C++ destructors that run after the interpreter shuts down can then hit a joinable thread and
call ``std::terminate`` (SIGABRT), replacing the exit code the run decided on. Code that detects
such a state calls :func:`mark_unsafe_teardown`; entry points end with :func:`exit_process`,
which flushes the Python streams and skips native teardown when it is unsafe.
"""

from __future__ import annotations

import contextlib
import os
import sys
from typing import NoReturn

_unsafe_reason: str | None = None


def mark_unsafe_teardown(reason: str) -> None:
    """Record that native teardown may abort (the first reason is kept)."""
    global _unsafe_reason
    if _unsafe_reason is None:
        _unsafe_reason = reason


def unsafe_teardown() -> str | None:
    """Why native teardown is unsafe, or ``None``."""
    return _unsafe_reason


def reset_unsafe_teardown() -> None:
    """Forget the mark (for tests that run several scenarios in one process)."""
    global _unsafe_reason
    _unsafe_reason = None


def exit_process_now(code: int) -> NoReturn:
    """``os._exit(code)`` once the Python streams are flushed: no native teardown at all (for
    child processes whose state needs none)."""
    _flush_streams()
    os._exit(code)


def _flush_streams() -> None:
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):  # a closed or broken stream
            stream.flush()


def exit_process(code: int) -> NoReturn:
    """End the process with ``code``: a normal exit, or, after :func:`mark_unsafe_teardown`,
    ``os._exit`` once the Python streams are flushed (log sinks flush on every record)."""
    if _unsafe_reason is None:
        raise SystemExit(code)
    _flush_streams()
    os._exit(code)
