"""The line a warm local server waits for: the contract between the fleet that starts it
(``inference/fleet/prewarm.py``) and the server that reads it (``inference/local/__main__.py``).

A server started with :data:`WAIT_FLAG` alone imports its stack, then reads one JSON line from
stdin, a :class:`Handover`, and runs as if launched with its ``argv``, its output appended to
``log``.
"""

from __future__ import annotations

import msgspec

WAIT_FLAG = "--wait-for-args"
"""The local server's only argument when it is started warm."""


class Handover(msgspec.Struct, frozen=True):
    """What a warm server reads from its stdin: its arguments and the log its output goes to."""

    argv: list[str]
    log: str
