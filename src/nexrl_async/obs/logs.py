"""Logging set-up: loguru, configured once per process, with the stdlib routed into it.

Call :func:`setup_logging` first thing in every process (rank 0, followers, the local server).
It may be called again (tests do); each call replaces the sinks the previous one added and
leaves sinks added by others alone.

- Console: one sink on a :class:`~nexrl_async.obs.terminal.Terminal` (stderr), so log lines and
  the live progress line do not overwrite each other.
- Ranks: rank 0 logs at ``level``; other ranks log ``WARNING`` and up (docs/style.md). When the
  world size is above 1 every line carries ``rank<r>``.
- File: with ``run_dir``, every rank also appends to ``<run_dir>/logs/rank<r>.log`` (plain text,
  same level as its console).
- Stdlib: the root ``logging`` logger gets one :class:`InterceptHandler` that forwards records
  to loguru with their level and call site, so httpx, uvicorn, transformers and friends log
  through loguru. transformers' own stderr handler is switched off in favour of propagation.
  The ``quiet`` loggers (``logging.quiet_loggers``: HTTP clients such as ``httpx``,
  ``urllib3`` and ``openai`` that log one INFO line per request, the user's own clients
  included, and ``uvicorn.access``) are held at WARNING unless the level is TRACE. uvicorn
  servers must be built with ``log_config=None`` so uvicorn does not install handlers of its
  own after this runs.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from loguru import logger

from nexrl_async.config.schema import LoggingConfig
from nexrl_async.core.errors import ConfigError
from nexrl_async.obs.terminal import Terminal

_CONSOLE_TIME = "<green>{time:HH:mm:ss.SSS}</green>"
_FILE_TIME = "<green>{time:YYYY-MM-DD HH:mm:ss.SSS}</green>"
_BODY = "<level>{level: <8}</level> | {rank}<cyan>{name}</cyan>:<cyan>{line}</cyan> - {message}"
QUIET_LOGGERS = LoggingConfig().quiet_loggers
"""Libraries whose INFO lines are per request (``logging.quiet_loggers``' default)."""
_UVICORN_LOGGERS = ("uvicorn", "uvicorn.error", "uvicorn.access")


@dataclass
class _State:
    """Handler ids this module added to loguru (removed on the next call)."""

    handler_ids: list[int] = field(default_factory=list)
    default_removed: bool = False
    quietened: set[str] = field(default_factory=set)
    """Loggers the last call held at WARNING."""


_STATE = _State()


class InterceptHandler(logging.Handler):
    """A stdlib handler that re-emits every record through loguru.

    The loguru level is the record's level name when loguru knows it, else its number. The
    reported call site is the first frame outside the ``logging`` package, not this handler.
    """

    def emit(self, record: logging.LogRecord) -> None:
        level: str | int
        try:
            level = logger.level(record.levelname).name
        except ValueError:
            level = record.levelno
        frame = sys._getframe(1)
        depth = 1
        while frame.f_back is not None and frame.f_code.co_filename == logging.__file__:
            frame = frame.f_back
            depth += 1
        logger.opt(depth=depth, exception=record.exc_info).log(level, record.getMessage())


def setup_logging(
    *,
    level: str = "INFO",
    rank: int = 0,
    world_size: int | None = None,
    run_dir: Path | None = None,
    colorize: bool | None = None,
    terminal: Terminal | None = None,
    quiet: Sequence[str] = QUIET_LOGGERS,
) -> Terminal:
    """Configure loguru for this process and return the console :class:`Terminal`.

    ``level`` is a loguru level name (TRACE, DEBUG, INFO, SUCCESS, WARNING, ERROR). Ranks above
    0 log at WARNING or higher whatever ``level`` says. ``world_size`` defaults to the
    ``WORLD_SIZE`` environment variable (set by torchrun), else 1. ``colorize`` defaults to
    whether the terminal is a TTY (and ``NO_COLOR`` is unset). ``terminal`` defaults to a new
    one on the current ``sys.stderr``; hand the returned one to the progress line. ``quiet``
    names the stdlib loggers held at WARNING (see the module docstring); a logger a previous
    call quietened and this one does not is set back to the level.
    """
    levelno = _effective_levelno(level, rank)
    world = world_size if world_size is not None else int(os.environ.get("WORLD_SIZE", "1"))
    rank_tag = f"rank{rank} | " if world > 1 else ""
    console = terminal if terminal is not None else Terminal()
    color = console.wants_color() if colorize is None else colorize

    _remove_own_handlers()
    ids = _STATE.handler_ids
    ids.append(
        logger.add(
            console,
            level=levelno,
            format=_format(_CONSOLE_TIME, rank_tag),
            colorize=color,
            backtrace=False,
            diagnose=False,
        )
    )
    if run_dir is not None:
        log_path = Path(run_dir) / "logs" / f"rank{rank}.log"
        log_path.parent.mkdir(parents=True, exist_ok=True)
        ids.append(
            logger.add(
                log_path,
                level=levelno,
                format=_format(_FILE_TIME, rank_tag),
                colorize=False,
                mode="a",
                encoding="utf-8",
                backtrace=False,
                diagnose=False,
            )
        )
    _route_stdlib(levelno, quiet)
    return console


def reset_logging() -> None:
    """Undo :func:`setup_logging`: remove its sinks and its stdlib handler (for tests)."""
    _remove_own_handlers()
    root = logging.getLogger()
    root.handlers = [h for h in root.handlers if not isinstance(h, InterceptHandler)]


def _effective_levelno(level: str, rank: int) -> int:
    try:
        levelno = logger.level(level.upper()).no
    except ValueError as err:
        raise ConfigError(
            f"logging.level = {level!r}: expected one of TRACE, DEBUG, INFO, SUCCESS, "
            "WARNING, ERROR",
            path="logging.level",
        ) from err
    if rank > 0:
        return max(levelno, logging.WARNING)
    return levelno


def _format(time_part: str, rank_tag: str) -> str:
    """The sink's format string (loguru strips the colour tags where ``colorize`` is off, and
    appends the newline and any traceback itself)."""
    return f"{time_part} | " + _BODY.replace("{rank}", rank_tag)


def _remove_own_handlers() -> None:
    if not _STATE.default_removed:
        # loguru starts with a stderr sink of id 0; drop it once so lines are not doubled.
        with contextlib.suppress(ValueError):  # somebody removed it already
            logger.remove(0)
        _STATE.default_removed = True
    for handler_id in _STATE.handler_ids:
        with contextlib.suppress(ValueError):  # removed by someone else (logger.remove())
            logger.remove(handler_id)
    _STATE.handler_ids.clear()


def _route_stdlib(levelno: int, quiet: Sequence[str]) -> None:
    """Send every stdlib record at ``levelno`` or above through loguru; ``quiet`` loggers
    only from WARNING (unless ``levelno`` is TRACE)."""
    root = logging.getLogger()
    root.handlers = [InterceptHandler()]
    root.setLevel(levelno)
    quiet_level = levelno if levelno <= logger.level("TRACE").no else logging.WARNING
    for name in _STATE.quietened - set(quiet):
        logging.getLogger(name).setLevel(logging.NOTSET)
    for name in quiet:
        logging.getLogger(name).setLevel(max(quiet_level, levelno))
    _STATE.quietened = set(quiet)
    for name in _UVICORN_LOGGERS:
        # Only matters when uvicorn configured itself before us (log_config left at default).
        lib_logger = logging.getLogger(name)
        lib_logger.handlers = []
        lib_logger.propagate = True
    _route_transformers()


def _route_transformers() -> None:
    """Switch transformers' own stderr handler off and let its records propagate to the root.

    transformers installs its handler lazily on import and disables propagation, so this goes
    through its API (importing ``transformers.utils.logging`` does not import torch).
    """
    if importlib.util.find_spec("transformers") is None:
        return
    from transformers.utils import logging as hf_logging

    hf_logging.disable_default_handler()
    hf_logging.enable_propagation()
