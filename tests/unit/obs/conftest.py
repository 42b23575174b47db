"""Fixtures for the obs tests: loguru output captured into a list, logging reset afterwards."""

from __future__ import annotations

import io
import logging
from collections.abc import Iterator

import pytest
from loguru import logger

from nexrl_async.obs import Terminal, reset_logging


@pytest.fixture
def log_messages() -> Iterator[list[str]]:
    """Every loguru message at DEBUG and up while the test runs (``"LEVEL message"``)."""
    messages: list[str] = []
    handler_id = logger.add(
        lambda m: messages.append(m.rstrip("\n")), level="DEBUG", format="{level} {message}"
    )
    yield messages
    logger.remove(handler_id)


@pytest.fixture
def console() -> Iterator[tuple[Terminal, io.StringIO]]:
    """A non-TTY terminal on a string buffer; logging set-up is undone after the test."""
    buffer = io.StringIO()
    root = logging.getLogger()
    saved = (list(root.handlers), root.level)
    yield Terminal(buffer, is_tty=False), buffer
    reset_logging()
    root.handlers, level = saved
    root.setLevel(level)
