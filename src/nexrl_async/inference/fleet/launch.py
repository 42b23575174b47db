"""Server commands and server processes: build each launched server's argv, spawn it, stop it.

A launched server runs in its own session (``start_new_session``), so it and every process it
forks share one process group that :meth:`ServerProcess.stop` signals as a whole: SIGTERM, then
SIGKILL after ``stop_grace_s``. Its stdout and stderr go to a log file (appended across restarts),
never to the terminal.

Orphans: the fleet stops its servers in shielded scopes, so a cancelled or crashing run still
stops them. A parent killed with SIGKILL runs no cleanup at all; for that case, on Linux, every
server is spawned through a small exec shim that sets ``PR_SET_PDEATHSIG`` (SIGKILL) and then
``execvp``s the real command, so the kernel kills the server when the spawning thread (the event
loop thread) dies. Limits: the signal reaches the server's main process only (SGLang itself kills
its scheduler children when their parent dies), and it fires when the *thread* that spawned the
server exits, so the fleet must run on a loop thread that lives as long as the run (it does: the
engine's loop runs on the main thread).
"""

from __future__ import annotations

import contextlib
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import anyio
from loguru import logger

from nexrl_async.config.inference import (
    LaunchedInference,
    LocalInference,
    SGLangInference,
    VLLMInference,
)
from nexrl_async.core.errors import ConfigError
from nexrl_async.core.shim import shimmed
from nexrl_async.inference.fleet.prewarm import take_warm

TEMPLATE_FIELDS = ("python", "model", "host", "port", "tp", "api_key")
"""Placeholders a ``command`` template may use, each written as ``{name}``."""

ServerCommand = Callable[[Any, Path, int, int], tuple[list[str], dict[str, str]]]
"""``(the backend's [inference] section, model folder, port, server index) → (argv, the
variables added to the environment)``: how one backend launches one server (registered in
``inference.fleet.backends``)."""

_REAP_DEADLINE_S = 10.0
"""How long to wait for the kernel to reap a SIGKILLed server before giving up on it."""


@dataclass(frozen=True, slots=True)
class ServerSpec:
    """How to run one launched server: the same spec is reused for every restart."""

    index: int
    argv: tuple[str, ...]
    env: Mapping[str, str]
    """Variables added to the parent's environment (e.g. ``CUDA_VISIBLE_DEVICES``)."""
    host: str
    port: int
    log_path: Path

    @property
    def url(self) -> str:
        """Base URL the fleet and the client use."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        if host in ("0.0.0.0", "[::]"):
            host = "127.0.0.1"
        return f"http://{host}:{self.port}"


def free_ports(host: str, count: int) -> list[int]:
    """``count`` distinct ports the OS reports free on ``host`` (all held open while picking)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sockets: list[socket.socket] = []
    try:
        for _ in range(count):
            sock = socket.socket(family, socket.SOCK_STREAM)
            sockets.append(sock)
            sock.bind((host, 0))
        return [int(sock.getsockname()[1]) for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def build_specs(
    cfg: LaunchedInference, *, model_dir: Path, log_dir: Path, command: ServerCommand
) -> list[ServerSpec]:
    """One spec per server: argv and environment from ``command``, port, log file."""
    if cfg.base_port:
        ports = [cfg.base_port + i for i in range(cfg.servers)]
        if ports[-1] > 65535:
            raise ConfigError(
                f"inference.base_port = {cfg.base_port}: {cfg.servers} servers need ports up to "
                f"{ports[-1]}, above 65535"
            )
    else:
        ports = free_ports(cfg.host, cfg.servers)
    specs = []
    for index, port in enumerate(ports):
        argv, env = command(cfg, model_dir, port, index)
        specs.append(
            ServerSpec(
                index=index,
                argv=tuple(argv),
                env=env,
                host=cfg.host,
                port=port,
                log_path=log_dir / f"server{index}.log",
            )
        )
    return specs


def local_server(
    cfg: LocalInference, model_dir: Path, port: int, index: int
) -> tuple[list[str], dict[str, str]]:
    """:data:`ServerCommand` of our local server."""
    return local_command(cfg, model_dir=model_dir, port=port), {}


def sglang_server(
    cfg: SGLangInference, model_dir: Path, port: int, index: int
) -> tuple[list[str], dict[str, str]]:
    """:data:`ServerCommand` of SGLang."""
    return sglang_command(cfg, model_dir=model_dir, port=port), sglang_env(cfg, index)


def vllm_server(
    cfg: VLLMInference, model_dir: Path, port: int, index: int
) -> tuple[list[str], dict[str, str]]:
    """:data:`ServerCommand` of vLLM."""
    return vllm_command(cfg, model_dir=model_dir, port=port), vllm_env(cfg, index)


def local_command(cfg: LocalInference, *, model_dir: Path, port: int) -> list[str]:
    """argv of our local server (``nexrl_async.inference.local``)."""
    argv = [sys.executable, "-m", "nexrl_async.inference.local", "--model", str(model_dir)]
    argv += ["--host", cfg.host, "--port", str(port), "--max-batch", str(cfg.max_batch)]
    argv += ["--device", cfg.device]
    if cfg.api_key is not None:
        argv.append(f"--api-key={cfg.api_key}")  # "=" form: a key may begin with "-"
    return argv + list(cfg.extra_args)


def sglang_command(cfg: SGLangInference, *, model_dir: Path, port: int) -> list[str]:
    """argv of ``sglang.launch_server``, or of the recipe's ``command`` template."""
    model = cfg.model_path if cfg.model_path is not None else str(model_dir)
    if cfg.command is not None:
        values = {
            "python": cfg.python,
            "model": model,
            "host": cfg.host,
            "port": str(port),
            "tp": str(cfg.tp_size),
            "api_key": cfg.api_key,
        }
        return fill_template(cfg.command, values) + list(cfg.extra_args)
    argv = [cfg.python, "-m", "sglang.launch_server", "--model-path", model]
    argv += ["--host", cfg.host, "--port", str(port), "--tp-size", str(cfg.tp_size)]
    argv += ["--mem-fraction-static", str(cfg.mem_fraction_static)]
    if cfg.api_key is not None:
        argv.append(f"--api-key={cfg.api_key}")  # "=" form: a key may begin with "-"
    return argv + list(cfg.extra_args)


def fill_template(template: Sequence[str], values: Mapping[str, str | None]) -> list[str]:
    """Replace ``{name}`` placeholders; other braces (JSON arguments) stay as written."""
    if not template:
        raise ConfigError("inference.command: the template is empty")
    argv = []
    for arg in template:
        for name, value in values.items():
            token = "{" + name + "}"
            if token not in arg:
                continue
            if value is None:
                raise ConfigError(f"inference.command uses {token} but inference.{name} is unset")
            arg = arg.replace(token, value)
        argv.append(arg)
    return argv


def sglang_env(cfg: SGLangInference, index: int) -> dict[str, str]:
    """``CUDA_VISIBLE_DEVICES`` of server ``index``: ``gpus_per_server`` ids from ``gpu_offset``."""
    first = cfg.gpu_offset + index * cfg.gpus_per_server
    gpus = ",".join(str(gpu) for gpu in range(first, first + cfg.gpus_per_server))
    return {"CUDA_VISIBLE_DEVICES": gpus}


def vllm_command(cfg: VLLMInference, *, model_dir: Path, port: int) -> list[str]:
    """argv of vLLM's API server (docs/vllm.md §2): token-in/token-out routes on."""
    python = cfg.python or os.environ.get("NEXRL_VLLM_PYTHON") or "python"
    argv = [python, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir)]
    argv += ["--host", cfg.host, "--port", str(port), "--dtype", cfg.dtype]
    argv += ["--enable-scale-out", "--logprobs-mode", cfg.logprobs_mode]
    if cfg.max_model_len is not None:
        argv += ["--max-model-len", str(cfg.max_model_len)]
    if cfg.device == "cpu" if cfg.enforce_eager is None else cfg.enforce_eager:
        argv.append("--enforce-eager")
    if cfg.device == "cuda":
        argv += ["--tensor-parallel-size", str(cfg.tensor_parallel_size)]
        argv += ["--gpu-memory-utilization", str(cfg.gpu_memory_utilization)]
    return argv + list(cfg.extra_args)  # the API key goes by environment (vllm_env)


def vllm_env(cfg: VLLMInference, index: int) -> dict[str, str]:
    """Dev mode (the RL routes), a keep-alive above the client's, no telemetry or hub access;
    the API key (``VLLM_API_KEY``: not in argv, so neither in ``ps`` nor in the server log; it
    guards ``/v1``, ``/inference``, not the RL routes); the KV cache size on CPU, the server's
    GPUs on CUDA; then ``inference.env``."""
    env = {
        "VLLM_SERVER_DEV_MODE": "1",
        "VLLM_HTTP_TIMEOUT_KEEP_ALIVE": str(cfg.keep_alive_s),
        "VLLM_NO_USAGE_STATS": "1",
        "DO_NOT_TRACK": "1",
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
    }
    if cfg.api_key is not None:
        env["VLLM_API_KEY"] = cfg.api_key
    if cfg.device == "cpu":
        env["VLLM_CPU_KVCACHE_SPACE"] = str(cfg.cpu_kvcache_gib)
    else:
        first = cfg.gpu_offset + index * cfg.tensor_parallel_size
        gpus = range(first, first + cfg.tensor_parallel_size)
        env["CUDA_VISIBLE_DEVICES"] = ",".join(str(gpu) for gpu in gpus)
    return {**env, **cfg.env}


class _Process(Protocol):
    """What :class:`ServerProcess` needs of a process: a spawned one or a warm one taken."""

    @property
    def pid(self) -> int: ...
    @property
    def returncode(self) -> int | None: ...
    async def wait(self) -> int: ...


class ServerProcess:
    """One running server process (a process-group leader); stop it with :meth:`stop`."""

    def __init__(self, spec: ServerSpec, process: _Process) -> None:
        self.spec = spec
        self._process = process

    @property
    def pid(self) -> int:
        return self._process.pid

    @property
    def returncode(self) -> int | None:
        return self._process.returncode

    @classmethod
    async def spawn(cls, spec: ServerSpec, *, attempt: int) -> ServerProcess:
        """Start the server; the spawn itself is shielded so no started process goes untracked."""
        if shutil.which(spec.argv[0]) is None:
            raise ConfigError(
                f"inference server {spec.index}: command not found: {spec.argv[0]!r} "
                "(check inference.python or inference.command)"
            )
        spec.log_path.parent.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "PYTHONUNBUFFERED": "1", **spec.env}
        warm = take_warm(spec.argv, spec.env) if attempt == 0 else None
        process: _Process
        with spec.log_path.open("ab") as log, anyio.CancelScope(shield=True):
            command = shlex.join(_redacted(spec.argv))
            how = "warm start" if warm is not None else "launch"
            header = f"=== nexrl_async: {how} {attempt} of server {spec.index}: {command}\n"
            log.write(header.encode())
            log.flush()
            if warm is not None:
                warm.hand_over(spec.argv[3:], spec.log_path)
                process = warm
            else:
                process = await anyio.open_process(
                    shimmed(spec.argv),
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=log,
                    env=env,
                    start_new_session=True,
                )
        logger.info(
            "inference server {} {} (pid {}, {}); log {}",
            spec.index,
            "taken warm" if warm is not None else "launched",
            process.pid,
            spec.url,
            spec.log_path,
        )
        return cls(spec, process)

    async def wait(self) -> int:
        """Wait for the process to exit; its exit code."""
        return await self._process.wait()

    async def stop(self, grace_s: float) -> None:
        """SIGTERM the process group, SIGKILL it after ``grace_s``, reap the leader. Shielded."""
        with anyio.CancelScope(shield=True):
            if self.returncode is None:
                self._signal_group(signal.SIGTERM)
                self._signal_group(signal.SIGCONT)  # a stopped process acts on SIGTERM only now
                with anyio.move_on_after(grace_s):
                    await self._process.wait()
            if self.returncode is None:
                logger.warning(
                    "inference server {} (pid {}) ignored SIGTERM for {}s; sending SIGKILL",
                    self.spec.index,
                    self.pid,
                    grace_s,
                )
            # Always: members of the group that outlived the leader go too.
            self._signal_group(signal.SIGKILL)
            with anyio.move_on_after(_REAP_DEADLINE_S) as reap:
                await self._process.wait()
            if reap.cancelled_caught:
                logger.error(
                    "inference server {} (pid {}) survived SIGKILL for {}s (stuck in the kernel?)",
                    self.spec.index,
                    self.pid,
                    _REAP_DEADLINE_S,
                )

    def kill_now(self) -> None:
        """SIGKILL the process group without waiting (last-resort cleanup)."""
        self._signal_group(signal.SIGKILL)

    def _signal_group(self, signum: signal.Signals) -> None:
        # The group may be gone already (PermissionError: macOS says so for a zombie leader).
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, signum)


def log_tail(path: Path, max_bytes: int = 2000) -> str:
    """The last ``max_bytes`` of a server log (for error reports); empty if unreadable."""
    try:
        with path.open("rb") as log:
            log.seek(0, os.SEEK_END)
            log.seek(max(0, log.tell() - max_bytes))
            return log.read().decode(errors="replace")
    except OSError:
        return ""


def _redacted(argv: Sequence[str]) -> list[str]:
    """``argv`` with the ``--api-key`` value hidden (the log is a file on disk)."""
    hidden = []
    for index, arg in enumerate(argv):
        if index and argv[index - 1] == "--api-key":
            arg = "***"
        elif arg.startswith("--api-key="):
            arg = "--api-key=***"
        hidden.append(arg)
    return hidden
