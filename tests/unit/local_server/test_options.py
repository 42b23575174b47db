"""Command line and options of the local server."""

from __future__ import annotations

import pytest

from nexrl_async.core.errors import ConfigError
from nexrl_async.inference.local import ServeOptions
from nexrl_async.inference.local.__main__ import main, parse_options


def test_fleet_style_argv_parses() -> None:
    argv = ["--model", "/m", "--host", "0.0.0.0", "--port", "31000", "--max-batch", "8"]
    argv += ["--device", "cpu", "--api-key", "k", "--weight-version", "3", "--torch-threads", "1"]
    options = parse_options(argv)
    assert options == ServeOptions(
        model_dir="/m",
        host="0.0.0.0",
        port=31000,
        max_batch=8,
        device="cpu",
        api_key="k",
        weight_version="3",
        torch_threads=1,
    )
    sglang_names = parse_options(["--model-path", "/m", "--max-running-requests", "2"])
    assert (sglang_names.model_dir, sglang_names.max_batch, sglang_names.host) == (
        "/m",
        2,
        "127.0.0.1",
    )


def test_bad_options_are_config_errors(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(ConfigError, match="max_batch"):
        ServeOptions(model_dir="/m", max_batch=0)
    assert main(["--model", "/m", "--port", "70000"]) == 2
    assert "port = 70000" in capsys.readouterr().err
    assert main(["--model", "/definitely/not/a/model", "--port", "0"]) == 2
    assert "no config.json" in capsys.readouterr().err


def test_a_launch_argv_carries_an_api_key_that_starts_with_a_dash(tmp_path) -> None:
    """Generated keys are URL-safe base64, which may begin with ``-``."""
    from nexrl_async.config.inference import LocalInference
    from nexrl_async.inference.fleet.launch import local_command

    cfg = LocalInference(api_key="-Xk3_dash-first")
    argv = local_command(cfg, model_dir=tmp_path, port=31000)
    options = parse_options(argv[3:])
    assert options.api_key == "-Xk3_dash-first"
