"""The backend registry (``inference.backend`` → client and launch line) and vLLM's launch line."""

from __future__ import annotations

from pathlib import Path

import httpx
import msgspec
import pytest

from nexrl_async.config.inference import (
    AttachInference,
    LocalInference,
    NoInference,
    SGLangInference,
    VLLMInference,
)
from nexrl_async.core.errors import ConfigError
from nexrl_async.inference.client.sglang import SGLangClient
from nexrl_async.inference.client.vllm import VLLMClient
from nexrl_async.inference.fleet.backends import BACKENDS, Backend, backend_for, open_client
from nexrl_async.inference.fleet.launch import build_specs, vllm_command, vllm_env


@pytest.mark.parametrize(
    ("cfg", "client_type", "launched"),
    [
        (LocalInference(), SGLangClient, True),
        (SGLangInference(), SGLangClient, True),
        (VLLMInference(), VLLMClient, True),
        (AttachInference(urls=["http://h:1"]), SGLangClient, False),
        (AttachInference(urls=["http://h:1"], api="vllm"), VLLMClient, False),
        (NoInference(), SGLangClient, False),
    ],
)
async def test_every_backend_has_its_client_and_launch_line(
    cfg: object, client_type: type, launched: bool
) -> None:
    async with httpx.AsyncClient() as http:
        client = open_client("http://h:1/", cfg, http=http)  # type: ignore[arg-type]
    assert type(client) is client_type
    assert client.base_url == "http://h:1"
    assert (backend_for(cfg).command is not None) == launched  # type: ignore[arg-type]


def test_an_unregistered_backend_is_a_config_error_naming_the_field(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delitem(BACKENDS, "vllm")
    with pytest.raises(ConfigError, match=r"inference.backend = 'vllm': unknown backend"):
        backend_for(VLLMInference())


def test_a_fourth_backend_is_one_registry_entry(monkeypatch: pytest.MonkeyPatch) -> None:
    """The fleet takes the command, the engine the client, from the entry alone."""
    seen: list[tuple[int, int]] = []

    def command(
        cfg: object, model_dir: Path, port: int, index: int
    ) -> tuple[list[str], dict[str, str]]:
        seen.append((port, index))
        return ["my-server", "--port", str(port)], {"MY_INDEX": str(index)}

    monkeypatch.setitem(BACKENDS, "sglang", Backend(VLLMClient.from_config, command))
    cfg = SGLangInference(servers=2, base_port=40000)
    specs = build_specs(
        cfg,
        model_dir=Path("/m"),
        log_dir=Path("/l"),
        command=backend_for(cfg).command,  # type: ignore[arg-type]
    )
    assert [spec.argv for spec in specs] == [
        ("my-server", "--port", "40000"),
        ("my-server", "--port", "40001"),
    ]
    assert [spec.env for spec in specs] == [{"MY_INDEX": "0"}, {"MY_INDEX": "1"}]


def test_vllm_cpu_command_is_the_documented_launch_line(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NEXRL_VLLM_PYTHON", raising=False)
    cfg = VLLMInference(dtype="float32", max_model_len=64, api_key="k", extra_args=["--seed", "0"])
    argv = vllm_command(cfg, model_dir=Path("/run/model"), port=8001)
    assert argv == [
        "python", "-m", "vllm.entrypoints.openai.api_server", "--model", "/run/model",
        "--host", "127.0.0.1", "--port", "8001", "--dtype", "float32",
        "--enable-scale-out", "--logprobs-mode", "processed_logprobs",
        "--max-model-len", "64", "--enforce-eager", "--seed", "0",
    ]  # fmt: skip
    env = vllm_env(cfg, 0)
    assert env["VLLM_SERVER_DEV_MODE"] == "1"
    assert env["VLLM_HTTP_TIMEOUT_KEEP_ALIVE"] == "60"
    assert env["VLLM_CPU_KVCACHE_SPACE"] == "1"
    assert env["VLLM_API_KEY"] == "k"  # not in argv: the log header prints argv
    assert "CUDA_VISIBLE_DEVICES" not in env


def test_vllm_python_defaults_to_the_environment_variable(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("NEXRL_VLLM_PYTHON", "/opt/vllm/bin/python")
    argv = vllm_command(VLLMInference(), model_dir=Path("/m"), port=1)
    assert argv[0] == "/opt/vllm/bin/python"
    explicit = VLLMInference(python="/x/python")
    assert vllm_command(explicit, model_dir=Path("/m"), port=1)[0] == "/x/python"


def test_vllm_on_gpus_takes_tp_gpus_per_server_and_no_eager_by_default() -> None:
    cfg = VLLMInference(
        device="cuda", tensor_parallel_size=2, gpu_offset=1, env={"VLLM_LOGGING_LEVEL": "DEBUG"}
    )
    argv = vllm_command(cfg, model_dir=Path("/m"), port=1)
    assert "--enforce-eager" not in argv
    assert argv[argv.index("--tensor-parallel-size") + 1] == "2"
    assert argv[argv.index("--gpu-memory-utilization") + 1] == "0.9"
    assert [vllm_env(cfg, i)["CUDA_VISIBLE_DEVICES"] for i in range(2)] == ["1,2", "3,4"]
    assert vllm_env(cfg, 0)["VLLM_LOGGING_LEVEL"] == "DEBUG"
    assert "VLLM_CPU_KVCACHE_SPACE" not in vllm_env(cfg, 0)
    eager = msgspec.structs.replace(cfg, enforce_eager=True)
    assert "--enforce-eager" in vllm_command(eager, model_dir=Path("/m"), port=1)
