"""The ASGI application: SGLang's routes, API-key check, FastAPI-style routing errors.

Routes served (anything else is ``404 {"detail": "Not Found"}``)::

    POST|PUT /generate                    POST /v1/chat/completions   POST /v1/completions
    GET  /v1/models                       GET  /health  /health_generate
    GET  /model_info  /get_model_info     GET  /server_info  /get_server_info   GET /v1/loads
    GET|POST /flush_cache                 POST /pause_generation  /continue_generation
    POST /abort_request                   POST /update_weights_from_disk
    POST /init_weights_update_group       POST /update_weights_from_distributed
    POST /destroy_weights_update_group    POST /begin_weight_update  /end_weight_update

With an API key every route but ``/health*``, ``/ready*`` and ``/metrics*`` needs
``Authorization: Bearer <key>`` (401 ``{"error": "Unauthorized"}`` otherwise), checked before
routing as SGLang's middleware does.
"""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable
from typing import Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request as HttpRequest
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from nexrl_async.inference.local import control_routes as control
from nexrl_async.inference.local import distributed_api, openai_api
from nexrl_async.inference.local.app_state import ServerContext
from nexrl_async.inference.local.error_responses import http_error, json_response, unauthorized
from nexrl_async.inference.local.generate import handle_generate

Handler = Callable[[HttpRequest, ServerContext], Awaitable[Response]]

_OPEN_PREFIXES = ("/health", "/ready", "/metrics")
_DISTRIBUTED = (
    "init_weights_update_group",
    "update_weights_from_distributed",
    "destroy_weights_update_group",
    "begin_weight_update",
    "end_weight_update",
)
"""Routes served by the handler of the same name in :mod:`distributed_api`."""


class ApiKeyMiddleware:
    """Rejects requests without ``Authorization: Bearer <api_key>`` (pure ASGI: streams pass)."""

    def __init__(self, app: ASGIApp, api_key: str) -> None:
        self.app = app
        self.expected = f"Bearer {api_key}".encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] != "OPTIONS":
            path: str = scope["path"]
            if not path.startswith(_OPEN_PREFIXES):
                given = dict(scope["headers"]).get(b"authorization", b"")
                if not hmac.compare_digest(given, self.expected):
                    await unauthorized()(scope, receive, send)
                    return
        await self.app(scope, receive, send)


def _bind(handler: Handler, ctx: ServerContext) -> Callable[[HttpRequest], Awaitable[Response]]:
    async def endpoint(http: HttpRequest) -> Response:
        try:
            return await handler(http, ctx)
        except control.BodyError as err:
            return err.response

    return endpoint


def _info(build: Callable[[ServerContext], dict[str, Any]]) -> Handler:
    async def handler(http: HttpRequest, ctx: ServerContext) -> Response:
        return json_response(build(ctx))

    return handler


async def _routing_error(http: HttpRequest, exc: Exception) -> Response:
    if isinstance(exc, HTTPException):
        return http_error(exc.status_code, str(exc.detail))
    raise exc


def build_app(ctx: ServerContext, *, api_key: str | None) -> ASGIApp:
    table: list[tuple[str, Handler, list[str]]] = [
        ("/generate", handle_generate, ["POST", "PUT"]),
        ("/v1/chat/completions", openai_api.chat_completions, ["POST"]),
        ("/v1/completions", openai_api.completions, ["POST"]),
        ("/v1/models", openai_api.models, ["GET"]),
        ("/health", control.health, ["GET"]),
        ("/health_generate", control.health, ["GET"]),
        ("/model_info", _info(control.model_info), ["GET"]),
        ("/get_model_info", _info(control.model_info), ["GET"]),
        ("/server_info", _info(control.server_info), ["GET"]),
        ("/get_server_info", _info(control.server_info), ["GET"]),
        ("/v1/loads", _info(control.loads), ["GET"]),
        ("/flush_cache", control.flush_cache, ["GET", "POST"]),
        ("/pause_generation", control.pause_generation, ["POST"]),
        ("/continue_generation", control.continue_generation, ["POST"]),
        ("/abort_request", control.abort_request, ["POST"]),
        ("/update_weights_from_disk", control.update_weights_from_disk, ["POST"]),
        *[(f"/{name}", getattr(distributed_api, name), ["POST"]) for name in _DISTRIBUTED],
    ]
    routes = [Route(path, _bind(h, ctx), methods=methods) for path, h, methods in table]
    app: ASGIApp = Starlette(routes=routes, exception_handlers={HTTPException: _routing_error})
    if api_key:
        app = ApiKeyMiddleware(app, api_key)
    return app
