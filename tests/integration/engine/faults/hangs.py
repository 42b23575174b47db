"""A synchronous evaluator that never returns on about one item in ten (a stuck reward call)."""

from __future__ import annotations

import threading
import zlib

from nexrl_async.core.records import DataItem, EvalResult, Trajectory

_FOREVER = threading.Event()


class HangsSometimes:
    def evaluate(self, item: DataItem, trajectory: Trajectory) -> EvalResult:
        if zlib.crc32(item.key.encode()) % 10 == 0:
            _FOREVER.wait()  # never set: blocks this thread for good
        return EvalResult(reward=float(trajectory.response_text.strip() == item.fields["answer"]))
