from __future__ import annotations

import io
import logging
from pathlib import Path

import pytest
from loguru import logger

from nexrl_async.core.errors import ConfigError
from nexrl_async.obs import Terminal, setup_logging

Console = tuple[Terminal, io.StringIO]


def test_loguru_lines_reach_the_console(console: Console) -> None:
    terminal, buffer = console
    setup_logging(terminal=terminal, world_size=1)
    logger.info("hello {}", 7)
    logger.debug("hidden at INFO")
    out = buffer.getvalue()
    assert "INFO" in out
    assert "hello 7" in out
    assert "hidden" not in out
    assert "rank0" not in out  # world size 1: no rank tag
    assert "\x1b[" not in out  # not a TTY: no colours


def test_stdlib_logging_is_routed_at_its_level_with_its_call_site(console: Console) -> None:
    terminal, buffer = console
    setup_logging(terminal=terminal, world_size=1)
    logging.getLogger("somelib.client").warning("disk %s is %d%% full", "sda", 93)
    logging.getLogger("somelib.client").debug("stdlib debug is filtered")
    lines = buffer.getvalue().splitlines()
    assert len(lines) == 1
    assert "WARNING" in lines[0]
    assert "disk sda is 93% full" in lines[0]
    assert "test_logs" in lines[0]  # the caller, not the logging package or the handler


def test_stdlib_exceptions_keep_their_traceback(console: Console) -> None:
    terminal, buffer = console
    setup_logging(terminal=terminal, world_size=1)
    try:
        raise KeyError("missing-key")
    except KeyError:
        logging.getLogger("somelib").exception("lookup failed")
    out = buffer.getvalue()
    assert "ERROR" in out
    assert "lookup failed" in out
    assert "KeyError" in out
    assert "missing-key" in out


def test_per_request_library_logs_are_held_at_warning(console: Console) -> None:
    terminal, buffer = console
    setup_logging(terminal=terminal, level="DEBUG", world_size=1)
    logging.getLogger("httpx").info('HTTP Request: POST http://x/generate "200 OK"')
    logging.getLogger("httpx").warning("httpx warning shows")
    out = buffer.getvalue()
    assert "HTTP Request" not in out
    assert "httpx warning shows" in out


def test_transformers_logs_go_through_loguru(
    console: Console, capsys: pytest.CaptureFixture[str]
) -> None:
    terminal, buffer = console
    setup_logging(terminal=terminal, world_size=1)
    from transformers.utils import logging as hf_logging

    hf_logging.get_logger("transformers.models.fake").warning("hf says hi")
    assert "hf says hi" in buffer.getvalue()
    assert "hf says hi" not in capsys.readouterr().err  # its own stderr handler is off


def test_rank_above_zero_logs_warnings_only_and_is_tagged(console: Console) -> None:
    terminal, buffer = console
    setup_logging(terminal=terminal, level="DEBUG", rank=1, world_size=2)
    logger.info("info from rank 1")
    logging.getLogger("somelib").info("stdlib info from rank 1")
    logger.warning("warning from rank 1")
    out = buffer.getvalue()
    assert "info from rank 1" not in out
    assert "warning from rank 1" in out
    assert "rank1" in out


def test_world_size_comes_from_the_environment(
    console: Console, monkeypatch: pytest.MonkeyPatch
) -> None:
    terminal, buffer = console
    monkeypatch.setenv("WORLD_SIZE", "4")
    setup_logging(terminal=terminal)
    logger.info("tagged")
    assert "rank0 | " in buffer.getvalue()


def test_file_sink_per_rank_appends(console: Console, tmp_path: Path) -> None:
    terminal, _ = console
    setup_logging(terminal=terminal, run_dir=tmp_path, world_size=1)
    logger.info("first run")
    setup_logging(terminal=terminal, run_dir=tmp_path, world_size=1)
    logger.info("resumed run")
    log_file = tmp_path / "logs" / "rank0.log"
    text = log_file.read_text()
    assert "first run" in text
    assert "resumed run" in text


def test_setup_again_replaces_its_sinks_and_keeps_foreign_ones(
    console: Console, log_messages: list[str]
) -> None:
    terminal, buffer = console
    setup_logging(terminal=terminal, world_size=1)
    setup_logging(terminal=terminal, world_size=1)
    logger.info("once")
    assert buffer.getvalue().count("once") == 1
    assert "INFO once" in log_messages  # a sink someone else added survives set-up


def test_reset_logging_detaches_everything_it_added(console: Console) -> None:
    from nexrl_async.obs import InterceptHandler, reset_logging

    terminal, buffer = console
    setup_logging(terminal=terminal, world_size=1)
    reset_logging()
    logger.info("after reset")
    assert "after reset" not in buffer.getvalue()
    assert not any(isinstance(h, InterceptHandler) for h in logging.getLogger().handlers)


def test_unknown_level_is_a_config_error(console: Console) -> None:
    terminal, _ = console
    with pytest.raises(ConfigError, match=r"logging\.level"):
        setup_logging(terminal=terminal, level="LOUD")


def test_colours_follow_the_terminal(console: Console, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NO_COLOR", raising=False)
    _, buffer = console
    setup_logging(terminal=Terminal(buffer, is_tty=True), world_size=1)
    logger.info("coloured")
    assert "\x1b[" in buffer.getvalue()


def test_no_color_turns_colours_off(console: Console, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NO_COLOR", "1")
    _, buffer = console
    setup_logging(terminal=Terminal(buffer, is_tty=True), world_size=1)
    logger.info("plain")
    assert "plain" in buffer.getvalue()
    assert "\x1b[" not in buffer.getvalue()


def test_a_users_own_http_clients_stay_out_of_the_run_log_unless_asked(
    console: Console, tmp_path: Path
) -> None:
    import anyio
    import httpx

    def judge() -> None:  # an evaluator's LLM-judge calls, in a worker thread as sync ones run
        transport = httpx.MockTransport(lambda request: httpx.Response(200, json={"score": 1}))
        with httpx.Client(transport=transport) as client:
            client.post("http://judge.invalid/score", json={})
        logging.getLogger("openai._base_client").info("openai retrying request")
        logging.getLogger("urllib3.connectionpool").info("Starting new HTTPS connection")

    def run_judge() -> str:
        anyio.run(anyio.to_thread.run_sync, judge)
        return (tmp_path / "logs" / "rank0.log").read_text() + buffer.getvalue()

    terminal, buffer = console
    setup_logging(terminal=terminal, world_size=1, run_dir=tmp_path)
    logged = run_judge()
    assert "HTTP Request" not in logged
    assert "openai retrying" not in logged
    assert "Starting new HTTPS" not in logged
    # a recipe that drops httpx from logging.quiet_loggers sees its lines again
    setup_logging(terminal=terminal, world_size=1, run_dir=tmp_path, quiet=["openai"])
    logged = run_judge()
    assert 'HTTP Request: POST http://judge.invalid/score "HTTP/1.1 200 OK"' in logged
    assert "Starting new HTTPS" in logged
    assert "openai retrying" not in logged
