"""The live progress line: step/total, reward, staleness, tokens/s and ETA.

On a TTY it is redrawn in place at the bottom of the terminal (log lines scroll above it; see
:class:`~nexrl_async.obs.terminal.Terminal`). Off a TTY (CI, ``nohup``, a scheduler's log file)
it becomes a plain INFO log line every ``log_every_s`` seconds, and at the last step. Disabled,
it does nothing. Only rank 0 shows one.

A small class rather than tqdm: the line must share the terminal with loguru, and off a TTY it
must be a log line; both would need wrapping tqdm anyway.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from loguru import logger

from nexrl_async.obs.terminal import Terminal


class ProgressLine:
    """Shows training progress; call :meth:`update` after each step, :meth:`close` at the end.

    ``total`` is the number of steps (``None`` when unknown: no ETA). ``terminal`` is the one
    :func:`~nexrl_async.obs.logs.setup_logging` returned (a new one on stderr by default).
    ``redraw_s`` rate-limits redraws on a TTY; ``log_every_s`` spaces the plain lines.
    """

    def __init__(
        self,
        total: int | None,
        *,
        terminal: Terminal | None = None,
        enabled: bool = True,
        redraw_s: float = 0.1,
        log_every_s: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.total = total
        self.enabled = enabled
        self._terminal = terminal if terminal is not None else Terminal()
        self._redraw_s = redraw_s
        self._log_every_s = log_every_s
        self._clock = clock
        self._first: tuple[int, float] | None = None
        self._last_shown = -float("inf")
        self._last_line = ""

    def update(
        self,
        step: int,
        *,
        reward: float | None = None,
        staleness: float | None = None,
        tokens_per_s: float | None = None,
        loss: float | None = None,
    ) -> None:
        """Record that ``step`` steps are done (1-based count) with the latest figures."""
        if not self.enabled:
            return
        now = self._clock()
        if self._first is None:
            # ETA comes from the rate since the first update (a resumed run starts mid-way).
            self._first = (step, now)
        eta_s = self._eta_s(step, now)
        line = format_progress(step, self.total, reward, staleness, tokens_per_s, eta_s, loss=loss)
        self._last_line = line
        done = self.total is not None and step >= self.total
        interval = self._redraw_s if self._terminal.isatty() else self._log_every_s
        if not done and now - self._last_shown < interval:
            return
        self._last_shown = now
        if self._terminal.isatty():
            self._terminal.show_status(line)
        else:
            logger.info("progress | {}", line)

    def close(self) -> None:
        """Leave the last line on screen (TTY) and stop drawing."""
        if self.enabled and self._terminal.isatty():
            self._terminal.clear_status(keep=True)
        self.enabled = False

    @property
    def last_line(self) -> str:
        """The most recent line (shown or rate-limited)."""
        return self._last_line

    def _eta_s(self, step: int, now: float) -> float | None:
        if self.total is None or self._first is None:
            return None
        first_step, first_time = self._first
        steps_done = step - first_step
        if steps_done <= 0:
            return None
        return max(self.total - step, 0) * (now - first_time) / steps_done


def format_progress(
    step: int,
    total: int | None,
    reward: float | None,
    staleness: float | None,
    tokens_per_s: float | None,
    eta_s: float | None,
    *,
    loss: float | None = None,
) -> str:
    """``step 12/100 | reward 0.532 | stale 1.5 | 1.2k tok/s | eta 3m04s`` (unknowns left out;
    ``loss 0.123`` after the step when given, as SFT runs show it instead of a reward)."""
    parts = [f"step {step}/{total}" if total is not None else f"step {step}"]
    if loss is not None:
        parts.append(f"loss {loss:.4g}")
    if reward is not None:
        parts.append(f"reward {reward:.3f}")
    if staleness is not None:
        parts.append(f"stale {staleness:.3g}")
    if tokens_per_s is not None:
        parts.append(f"{_si(tokens_per_s)} tok/s")
    if eta_s is not None:
        parts.append(f"eta {_duration(eta_s)}")
    return " | ".join(parts)


def _si(value: float) -> str:
    for scale, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= scale:
            return f"{value / scale:.1f}{suffix}"
    return f"{value:.0f}"


def _duration(seconds: float) -> str:
    total = round(seconds)
    hours, rest = divmod(total, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    if minutes:
        return f"{minutes}m{secs:02d}s"
    return f"{secs}s"
