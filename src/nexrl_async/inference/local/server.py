"""Running the local server: load the model, start the scheduler and uvicorn, stop gracefully.

``serve(options)`` is a long-lived coroutine for a task group; it reports the bound port through
``task_status`` once uvicorn listens. Shutdown (SIGTERM / SIGINT, or cancellation of ``serve``):
new requests get 503, in-flight ones are aborted (they answer 200 with ``finish_reason`` abort
and their partial tokens), uvicorn drains its connections for at most ``GRACE_S`` seconds, then
the scheduler stops.

```
python -m nexrl_async.inference.local --model /tmp/tiny --port 30000
```
"""

from __future__ import annotations

import contextlib
import gc
import importlib.util
import signal
import socket
from collections.abc import Iterator
from typing import Literal

import anyio
import anyio.to_thread
import msgspec
import torch
import uvicorn
from anyio.abc import TaskStatus
from loguru import logger

from nexrl_async.core.errors import ConfigError
from nexrl_async.inference.local.app import build_app
from nexrl_async.inference.local.app_state import ServerContext, longest_token
from nexrl_async.inference.local.http_io import DEFAULT_MAX_BODY_BYTES
from nexrl_async.inference.local.protocol import Limits
from nexrl_async.inference.local.runner import ModelRunner
from nexrl_async.inference.local.scheduler import Scheduler
from nexrl_async.inference.local.update_group import UpdateGroups, WeightSyncState
from nexrl_async.inference.local.weights import LoadedModel, load_model

GRACE_S = 5.0
"""How long uvicorn may drain open connections on shutdown."""

KEEP_ALIVE_S = 65
"""Idle keep-alive connections are closed after this. Longer than clients keep idle
connections (httpx: 5 s), so a client never reuses one that the server is closing at that
moment (uvicorn's default is 5 s too: the two race, and the request fails with a read error)."""

HTTP_PROTOCOL: Literal["httptools", "h11"] = (
    "httptools" if importlib.util.find_spec("httptools") is not None else "h11"
)
"""uvicorn's HTTP parser: httptools (C) where installed, h11 (pure Python) otherwise."""

_SAMPLING_DEFAULT_KEYS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty")


class ServeOptions(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Options of ``nexrl-async serve`` / ``python -m nexrl_async.inference.local``."""

    model_dir: str
    """Local HF model folder (config.json, safetensors, tokenizer)."""
    host: str = "127.0.0.1"
    """Interface to bind (SGLang's default is loopback too)."""
    port: int = 30000
    """TCP port; 0 picks a free one (reported through ``task_status``)."""
    api_key: str | None = None
    """Bearer key required on every route but ``/health*``."""
    max_batch: int = 64
    """Sequences decoded together (SGLang ``--max-running-requests``)."""
    device: Literal["auto", "cpu", "cuda"] = "cpu"
    """Torch device of the model."""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """Parameter dtype; ``auto`` = float32 on CPU, the checkpoint's dtype on GPU."""
    weight_version: str = "0"
    """Initial ``weight_version`` label (SGLang ``--weight-version``)."""
    served_model_name: str | None = None
    """Model id in ``/v1/models``; defaults to the current model path."""
    context_length: int | None = None
    """Context length; defaults to the model's ``max_position_embeddings``."""
    torch_threads: int = 0
    """``torch.set_num_threads``; 0 keeps torch's default."""
    seed: int = 0
    """Seed of the RNG used by requests without ``sampling_seed``."""
    update_group_timeout_s: float = 300.0
    """Deadline of a weight-update group's rendezvous and of each broadcast it receives."""
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    """Request bodies above this many bytes are refused with 413."""
    max_n: int = 64
    """Largest ``n`` (samples per prompt) one request may ask for."""
    max_request_sequences: int = 4096
    """Most sequences (prompts x ``n``) in one request."""

    def __post_init__(self) -> None:
        checks = [
            (0 <= self.port <= 65535, f"port = {self.port}: expected 0..65535"),
            (self.max_batch >= 1, f"max_batch = {self.max_batch}: expected >= 1"),
            (
                self.max_body_bytes >= 1024,
                f"max_body_bytes = {self.max_body_bytes}: expected >= 1024",
            ),
            (self.max_n >= 1, f"max_n = {self.max_n}: expected >= 1"),
            (
                self.max_request_sequences >= self.max_n,
                f"max_request_sequences = {self.max_request_sequences}: expected >= max_n",
            ),
            (self.torch_threads >= 0, f"torch_threads = {self.torch_threads}: expected >= 0"),
            (
                self.update_group_timeout_s > 0,
                f"update_group_timeout_s = {self.update_group_timeout_s}: expected > 0",
            ),
            (
                self.context_length is None or self.context_length >= 2,
                f"context_length = {self.context_length}: expected >= 2",
            ),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(f"serve: {message}")


class _Uvicorn(uvicorn.Server):
    """uvicorn without its own signal handlers (``serve`` owns them), with a started event."""

    def __init__(self, config: uvicorn.Config) -> None:
        super().__init__(config)
        self.listening = anyio.Event()

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        if self.started:
            self.listening.set()


def _context(options: ServeOptions, loaded: LoadedModel, scheduler: Scheduler) -> ServerContext:
    config = loaded.model.config
    groups = UpdateGroups(device=loaded.model.device, timeout_s=options.update_group_timeout_s)
    generation = loaded.model.generation_config
    defaults = {
        key: getattr(generation, key)
        for key in _SAMPLING_DEFAULT_KEYS
        if key in generation.to_diff_dict() and getattr(generation, key) is not None
    }
    return ServerContext(
        scheduler=scheduler,
        tokenizer=loaded.tokenizer,
        limits=Limits(
            context_length=loaded.context_length,
            vocab_size=int(loaded.model.get_output_embeddings().weight.shape[0]),
            max_n=options.max_n,
            max_sequences=options.max_request_sequences,
            chars_per_token=longest_token(loaded.tokenizer),
        ),
        served_model_name=options.served_model_name,
        tokenizer_path=options.model_dir,
        model_type=str(config.model_type),
        architectures=list(config.architectures or []),
        sampling_defaults=defaults,
        server_args={
            "host": options.host,
            "port": options.port,
            "max_running_requests": options.max_batch,
            "device": options.device,
            "dtype": str(loaded.model.dtype).removeprefix("torch."),
            "random_seed": options.seed,
            "api_key_set": options.api_key is not None,
        },
        weight_sync=WeightSyncState(groups=groups),
    )


def _freeze_heap() -> None:
    """Exclude everything alive after start-up (torch, transformers, the model: millions of
    objects) from the cyclic garbage collector. Otherwise each full collection walks them all
    again: ~0.4 s of CPU every few hundred requests on the demo's server."""
    gc.collect()
    gc.freeze()


async def _stop_on_signal(server: _Uvicorn, ctx: ServerContext) -> None:
    with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async for signum in signals:
            logger.info("received {}; shutting down", signal.Signals(signum).name)
            _begin_shutdown(server, ctx)
            return


def _begin_shutdown(server: _Uvicorn, ctx: ServerContext) -> None:
    ctx.shutting_down = True
    ctx.scheduler.close()
    ctx.weight_sync.groups.leave_all()
    server.should_exit = True


async def _report_started(server: _Uvicorn, task_status: TaskStatus[int]) -> None:
    await server.listening.wait()
    port = int(server.servers[0].sockets[0].getsockname()[1])
    logger.info("local SGLang-compatible server listening on port {}", port)
    task_status.started(port)


async def serve(
    options: ServeOptions,
    *,
    task_status: TaskStatus[int] = anyio.TASK_STATUS_IGNORED,
    handle_signals: bool = True,
) -> None:
    """Serve until SIGTERM / SIGINT (``handle_signals``) or cancellation."""
    if options.torch_threads > 0:
        torch.set_num_threads(options.torch_threads)
    torch.manual_seed(options.seed)
    loaded = await anyio.to_thread.run_sync(
        lambda: load_model(
            options.model_dir,
            device=options.device,
            dtype=options.dtype,
            context_length=options.context_length,
        )
    )
    runner = ModelRunner(
        loaded.model, loaded.tokenizer, eos_ids=loaded.eos_ids, version=options.weight_version
    )
    scheduler = Scheduler(
        runner,
        max_batch=options.max_batch,
        model_path=options.model_dir,
        weight_version=options.weight_version,
    )
    ctx = _context(options, loaded, scheduler)
    _freeze_heap()
    config = uvicorn.Config(
        build_app(ctx, api_key=options.api_key, max_body_bytes=options.max_body_bytes),
        host=options.host,
        port=options.port,
        http=HTTP_PROTOCOL,
        log_config=None,
        access_log=False,
        lifespan="off",
        timeout_graceful_shutdown=int(GRACE_S),
        timeout_keep_alive=KEEP_ALIVE_S,
        proxy_headers=False,  # never behind a proxy whose X-Forwarded-For matters
    )
    server = _Uvicorn(config)
    async with anyio.create_task_group() as tg:
        await tg.start(scheduler.run)
        await tg.start(ctx.watch.run)
        if handle_signals:
            tg.start_soon(_stop_on_signal, server, ctx)
        tg.start_soon(_report_started, server, task_status)
        try:
            await server.serve()
        except SystemExit as err:  # uvicorn exits when it cannot bind
            raise ConfigError(f"cannot listen on {options.host}:{options.port}") from err
        finally:
            with anyio.CancelScope(shield=True), anyio.move_on_after(GRACE_S + 1):
                if not server.should_exit:
                    _begin_shutdown(server, ctx)
                    await server.shutdown()
            tg.cancel_scope.cancel()
        with anyio.CancelScope(shield=True), anyio.move_on_after(GRACE_S):
            await anyio.to_thread.run_sync(ctx.weight_sync.groups.release, abandon_on_cancel=True)
    logger.info("local server stopped")


def main_serve(options: ServeOptions) -> None:
    """Blocking entry point (``nexrl-async serve``, ``python -m ...inference.local``); runs on
    uvloop where it is installed."""
    uvloop = importlib.util.find_spec("uvloop") is not None
    anyio.run(lambda: serve(options), backend_options={"use_uvloop": uvloop})
