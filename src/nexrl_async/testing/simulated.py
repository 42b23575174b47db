"""A simulated SGLang server: SGLang's native HTTP shapes, no model, honest about time.

Run it as a process (what the fleet, benchmarks and subprocess tests do)::

    python -m nexrl_async.testing.simulated --host 127.0.0.1 --port 30000 \\
        --token-latency-s 0.01 --mean-output-tokens 200 [--incremental-streaming-output]

or in-process::

    sim = SimulatedServer(SimulatedConfig(token_latency_s=0.0))
    async with httpx.AsyncClient(transport=sim.transport()) as http:   # no sockets; buffers
        client = SGLangClient(SimulatedServer.ASGI_URL, http=http)     # streams whole
    async with sim.serve() as url:                                      # uvicorn, free port
        ...

``sim.engine.faults`` injects failures (503s, SSE error events, truncated or garbled streams,
failed weight updates, unhealthy probes) and ``sim.engine.stats`` records what the server saw;
a subprocess exposes both as ``POST /_sim/faults`` and ``GET /_sim/stats``. What it serves:
``/generate`` (single, batch, ``n > 1``, cumulative / incremental / mixed streams, logprobs,
``weight_version(s)``, every finish reason incl. aborts), health, model/server info (with the
``get_`` aliases), ``/v1/loads``, flush, pause/continue, abort, weight updates from disk and
through a (pretend) distributed group, begin/end sessions, weight version, memory
release/resume, and SGLang's error bodies. See ``simulated_engine`` for the timing model.
"""

from __future__ import annotations

import argparse
import socket
import sys
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager

import anyio
import httpx
import uvicorn
from loguru import logger
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

from nexrl_async.testing.simulated_config import SimulatedConfig, StreamOutput
from nexrl_async.testing.simulated_engine import Faults, SimulatedEngine, Stats
from nexrl_async.testing.simulated_responses import json_response, not_found, unauthorized
from nexrl_async.testing.simulated_routes import routes

__all__ = ["Faults", "SimulatedConfig", "SimulatedEngine", "SimulatedServer", "Stats", "build_app"]

_OPEN_PREFIXES = ("/health", "/ready", "/metrics", "/_sim/")


class BearerAuth:
    """SGLang's ``--api-key``: every route but health/ready/metrics needs the bearer key."""

    def __init__(self, app: ASGIApp, api_key: str) -> None:
        self._app = app
        self._expected = f"Bearer {api_key}".encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and not str(scope["path"]).startswith(_OPEN_PREFIXES):
            headers = dict(scope["headers"])
            if headers.get(b"authorization") != self._expected:
                await unauthorized()(scope, receive, send)
                return
        await self._app(scope, receive, send)


async def _not_found(request: Request, exc: Exception) -> Response:
    return not_found()


async def _method_not_allowed(request: Request, exc: Exception) -> Response:
    return json_response({"detail": "Method Not Allowed"}, 405)


def build_app(engine: SimulatedEngine) -> ASGIApp:
    """The ASGI app serving ``engine``."""
    app = Starlette(
        routes=routes(engine.config.legacy),
        exception_handlers={404: _not_found, 405: _method_not_allowed},
    )
    app.state.engine = engine
    if engine.config.api_key:
        return BearerAuth(app, engine.config.api_key)
    return app


class SimulatedServer:
    """The simulated server's engine and app, reachable in-process or over a real socket."""

    ASGI_URL = "http://simulated-sglang"
    """Base URL to use with :meth:`transport` (any host works; this one reads well in logs)."""

    def __init__(self, config: SimulatedConfig | None = None) -> None:
        self.config = config or SimulatedConfig()
        self.engine = SimulatedEngine(self.config)
        self.app = build_app(self.engine)

    def transport(self) -> httpx.ASGITransport:
        """An in-process transport: fast, no sockets; responses (also streams) are buffered
        until the handler finishes, so use :meth:`serve` to observe streaming in time."""
        return httpx.ASGITransport(app=self.app)

    @asynccontextmanager
    async def serve(self, host: str = "127.0.0.1", port: int = 0) -> AsyncIterator[str]:
        """Serve with uvicorn in this event loop (asyncio) on ``port`` (0: a free one); yields
        the base URL and stops the server on exit."""
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        config = uvicorn.Config(
            self.app, log_level="warning", lifespan="off", timeout_graceful_shutdown=1
        )
        server = uvicorn.Server(config)
        try:
            async with anyio.create_task_group() as group:
                group.start_soon(server.serve, [sock])
                with anyio.fail_after(10):
                    while not server.started:  # noqa: ASYNC110  uvicorn exposes only a flag
                        await anyio.sleep(0.005)
                try:
                    yield f"http://{host}:{sock.getsockname()[1]}"
                finally:
                    server.should_exit = True
        finally:
            sock.close()


def parse_args(argv: Sequence[str]) -> tuple[str, int, SimulatedConfig]:
    """Command line → (host, port, config). Unknown (e.g. SGLang-only) flags are ignored."""
    parser = argparse.ArgumentParser(
        prog="python -m nexrl_async.testing.simulated",
        description="Simulated SGLang server (native HTTP API, no model).",
    )
    add = parser.add_argument
    add("--host", default="127.0.0.1")
    add("--port", type=int, default=30000)
    add("--model-path", "--model", default="simulated-model")
    add("--token-latency-s", type=float, default=0.0)
    add("--prefill-latency-s", type=float, default=0.0)
    add("--mean-output-tokens", type=float, default=64.0)
    add("--output-tokens-sigma", type=float, default=1.0)
    add("--vocab-size", type=int, default=32000)
    add("--eos-token-id", type=int, default=2)
    add("--context-length", type=int, default=8192)
    add("--seed", "--random-seed", type=int, default=0)
    add("--stream-interval", type=int, default=1)
    add("--stream-output", choices=["cumulative", "incremental", "mixed"], default=None)
    add("--incremental-streaming-output", "--stream-output-incremental", action="store_true")
    add("--weight-version", default="default")
    add("--api-key", default=None)
    add("--legacy", action="store_true", help="behave like SGLang <= 0.5.15")
    add("--skip-tokenizer-init", action="store_true", help="no `text` in responses")
    args, unknown = parser.parse_known_args(list(argv))
    if unknown:
        logger.warning("simulated SGLang ignores {}", " ".join(unknown))
    stream_output: StreamOutput = args.stream_output or (
        "incremental" if args.incremental_streaming_output else "cumulative"
    )
    config = SimulatedConfig(
        model_path=args.model_path,
        vocab_size=args.vocab_size,
        eos_token_id=args.eos_token_id,
        context_length=args.context_length,
        seed=args.seed,
        token_latency_s=args.token_latency_s,
        prefill_latency_s=args.prefill_latency_s,
        mean_output_tokens=args.mean_output_tokens,
        output_tokens_sigma=args.output_tokens_sigma,
        stream_output=stream_output,
        stream_interval=args.stream_interval,
        weight_version=args.weight_version,
        api_key=args.api_key,
        legacy=args.legacy,
        return_text=not args.skip_tokenizer_init,
    )
    return args.host, args.port, config


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of ``python -m nexrl_async.testing.simulated``."""
    host, port, config = parse_args(sys.argv[1:] if argv is None else argv)
    server = SimulatedServer(config)
    logger.info("simulated SGLang on http://{}:{} ({})", host, port, config)
    uvicorn.run(server.app, host=host, port=port, log_level="warning", lifespan="off")


if __name__ == "__main__":
    main()
