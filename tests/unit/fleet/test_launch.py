"""Server commands: local and SGLang argv, the command template, GPUs, ports, log files."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from nexrl_async.config.inference import LocalInference, SGLangInference
from nexrl_async.core.errors import ConfigError
from nexrl_async.inference.fleet.launch import (
    ServerSpec,
    build_specs,
    fill_template,
    free_ports,
    local_command,
    local_server,
    log_tail,
    sglang_command,
    sglang_env,
    sglang_server,
)


def test_local_command_has_exactly_the_local_server_flags() -> None:
    cfg = LocalInference(max_batch=8, device="cuda", api_key="k", extra_args=["--seed", "1"])
    argv = local_command(cfg, model_dir=Path("/m"), port=9000)
    assert argv == [
        sys.executable,
        "-m",
        "nexrl_async.inference.local",
        "--model",
        "/m",
        "--host",
        "127.0.0.1",
        "--port",
        "9000",
        "--max-batch",
        "8",
        "--device",
        "cuda",
        "--api-key=k",
        "--seed",
        "1",
    ]
    assert "--api-key" not in local_command(LocalInference(), model_dir=Path("/m"), port=1)


def test_sglang_command_defaults_to_launch_server() -> None:
    cfg = SGLangInference(python="/envs/sgl/bin/python", tp_size=2, mem_fraction_static=0.7)
    argv = sglang_command(cfg, model_dir=Path("/run/weights/v0"), port=30001)
    assert argv == [
        "/envs/sgl/bin/python",
        "-m",
        "sglang.launch_server",
        "--model-path",
        "/run/weights/v0",
        "--host",
        "127.0.0.1",
        "--port",
        "30001",
        "--tp-size",
        "2",
        "--mem-fraction-static",
        "0.7",
    ]
    extra = ["--log-level", "warning"]
    with_key = SGLangInference(model_path="/hf/qwen", api_key="s3", extra_args=extra)
    argv = sglang_command(with_key, model_dir=Path("/ignored"), port=1)
    assert argv[argv.index("--model-path") + 1] == "/hf/qwen"
    assert argv[-3:] == ["--api-key=s3", "--log-level", "warning"]


def test_command_template_fills_placeholders_and_keeps_other_braces() -> None:
    cfg = SGLangInference(
        python="py",
        api_key="k",
        tp_size=4,
        command=["{python}", "-m", "x", "--at={host}:{port}", "--tp={tp}", "{model}", "{api_key}"],
        extra_args=["--json", '{"a": 1}'],
    )
    argv = sglang_command(cfg, model_dir=Path("/m"), port=7)
    assert argv == ["py", "-m", "x", "--at=127.0.0.1:7", "--tp=4", "/m", "k", "--json", '{"a": 1}']


def test_command_template_errors() -> None:
    with pytest.raises(ConfigError, match=r"\{api_key\} but inference.api_key is unset"):
        fill_template(["x", "--key", "{api_key}"], {"api_key": None})
    with pytest.raises(ConfigError, match="empty"):
        fill_template([], {})


def test_each_sglang_server_gets_its_own_gpus() -> None:
    cfg = SGLangInference(gpu_offset=2, gpus_per_server=2, servers=3, base_port=31000)
    assert [sglang_env(cfg, i) for i in range(3)] == [
        {"CUDA_VISIBLE_DEVICES": "2,3"},
        {"CUDA_VISIBLE_DEVICES": "4,5"},
        {"CUDA_VISIBLE_DEVICES": "6,7"},
    ]
    specs = build_specs(cfg, model_dir=Path("/m"), log_dir=Path("/run/logs"), command=sglang_server)
    assert [spec.env for spec in specs] == [sglang_env(cfg, i) for i in range(3)]
    assert [spec.port for spec in specs] == [31000, 31001, 31002]
    assert [spec.url for spec in specs][1] == "http://127.0.0.1:31001"
    assert [spec.log_path for spec in specs][2] == Path("/run/logs/server2.log")
    assert specs[0].argv[specs[0].argv.index("--port") + 1] == "31000"


def test_local_servers_get_free_distinct_ports_when_base_port_is_zero() -> None:
    specs = build_specs(
        LocalInference(servers=3), model_dir=Path("/m"), log_dir=Path("/l"), command=local_server
    )
    ports = [spec.port for spec in specs]
    assert len(set(ports)) == 3
    assert all(port > 0 for port in ports)
    assert all(spec.env == {} for spec in specs)
    assert len(set(free_ports("127.0.0.1", 5))) == 5


def test_ports_past_65535_are_a_config_error() -> None:
    cfg = LocalInference(servers=3, base_port=65534)
    with pytest.raises(ConfigError, match="base_port"):
        build_specs(cfg, model_dir=Path("/m"), log_dir=Path("/l"), command=local_server)


@pytest.mark.parametrize(
    ("host", "url"),
    [
        ("127.0.0.1", "http://127.0.0.1:5"),
        ("0.0.0.0", "http://127.0.0.1:5"),
        ("::1", "http://[::1]:5"),
        ("node7", "http://node7:5"),
    ],
)
def test_spec_url(host: str, url: str) -> None:
    spec = ServerSpec(index=0, argv=("x",), env={}, host=host, port=5, log_path=Path("l"))
    assert spec.url == url


def test_log_tail_reads_the_end(tmp_path: Path) -> None:
    log = tmp_path / "server0.log"
    log.write_text("a" * 5000 + "the end\n")
    assert log_tail(log, max_bytes=8) == "the end\n"
    assert log_tail(tmp_path / "missing.log") == ""


def test_the_launch_log_never_shows_the_api_key() -> None:
    from nexrl_async.inference.fleet.launch import _redacted

    argv = ["python", "-m", "nexrl_async.inference.local", "--api-key", "s3cret", "--port", "1"]
    assert _redacted(argv) == [*argv[:4], "***", "--port", "1"]


def test_the_launch_log_hides_an_api_key_given_with_equals() -> None:
    from nexrl_async.inference.fleet.launch import _redacted

    argv = ["python", "-m", "sglang.launch_server", "--api-key=-s3cret", "--port", "1"]
    assert _redacted(argv) == [*argv[:3], "--api-key=***", "--port", "1"]
