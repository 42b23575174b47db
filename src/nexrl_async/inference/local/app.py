"""The ASGI application: SGLang's routes, API-key check, body limit, FastAPI-style routing errors.

Routes served (anything else is ``404 {"detail": "Not Found"}``, a known path with another
method ``405 {"detail": "Method Not Allowed"}``)::

    POST|PUT /generate                    POST /v1/chat/completions   POST /v1/completions
    GET  /v1/models                       GET  /health  /health_generate
    GET  /model_info  /get_model_info     GET  /server_info  /get_server_info   GET /v1/loads
    GET|POST /flush_cache                 POST /pause_generation  /continue_generation
    POST /abort_request                   POST /update_weights_from_disk
    POST /init_weights_update_group       POST /update_weights_from_distributed
    POST /destroy_weights_update_group    POST /begin_weight_update  /end_weight_update

In order, for every HTTP request: the API key (with one, every route but ``/health*``,
``/ready*`` and ``/metrics*`` needs ``Authorization: Bearer <key>``; 401
``{"error": "Unauthorized"}`` otherwise, before routing, as SGLang's middleware does), the route
(an exact-path table: no per-request regex, no middleware stack), then the body, read whole
within ``max_body_bytes`` (413 otherwise, before any of it is parsed). Handlers get a Starlette
``Request`` whose body is already there and return a Starlette ``Response``.
"""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from starlette.requests import Request as HttpRequest
from starlette.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

from nexrl_async.inference.local import control_routes as control
from nexrl_async.inference.local import distributed_api, openai_api
from nexrl_async.inference.local.app_state import ServerContext
from nexrl_async.inference.local.error_responses import (
    http_error,
    json_response,
    too_large,
    unauthorized,
)
from nexrl_async.inference.local.generate import handle_generate
from nexrl_async.inference.local.http_io import (
    DEFAULT_MAX_BODY_BYTES,
    BodyTooLarge,
    ClientGone,
    read_body,
)

Handler = Callable[[HttpRequest, ServerContext], Awaitable[ASGIApp]]
"""A route: returns the ASGI response to send (a Starlette ``Response`` or one that waits)."""

_OPEN_PREFIXES = ("/health", "/ready", "/metrics")
_DISTRIBUTED = (
    "init_weights_update_group",
    "update_weights_from_distributed",
    "destroy_weights_update_group",
    "begin_weight_update",
    "end_weight_update",
)
"""Routes served by the handler of the same name in :mod:`distributed_api`."""


@dataclass(frozen=True, slots=True)
class _Route:
    handler: Handler
    methods: frozenset[str]


def _info(build: Callable[[ServerContext], dict[str, Any]]) -> Handler:
    async def handler(http: HttpRequest, ctx: ServerContext) -> Response:
        return json_response(build(ctx))

    return handler


_POST = ("POST",)


def _table() -> dict[str, _Route]:
    rows: list[tuple[str, Handler, tuple[str, ...]]] = [
        ("/generate", handle_generate, ("POST", "PUT")),
        ("/v1/chat/completions", openai_api.chat_completions, ("POST",)),
        ("/v1/completions", openai_api.completions, ("POST",)),
        ("/v1/models", openai_api.models, ("GET",)),
        ("/health", control.health, ("GET",)),
        ("/health_generate", control.health, ("GET",)),
        ("/model_info", _info(control.model_info), ("GET",)),
        ("/get_model_info", _info(control.model_info), ("GET",)),
        ("/server_info", _info(control.server_info), ("GET",)),
        ("/get_server_info", _info(control.server_info), ("GET",)),
        ("/v1/loads", _info(control.loads), ("GET",)),
        ("/flush_cache", control.flush_cache, ("GET", "POST")),
        ("/pause_generation", control.pause_generation, ("POST",)),
        ("/continue_generation", control.continue_generation, ("POST",)),
        ("/abort_request", control.abort_request, ("POST",)),
        ("/update_weights_from_disk", control.update_weights_from_disk, ("POST",)),
        ("/update_weights_from_shared_memory", control.update_weights_from_shared_memory, _POST),
        *[(f"/{name}", getattr(distributed_api, name), ("POST",)) for name in _DISTRIBUTED],
    ]
    table = {}
    for path, handler, methods in rows:
        allowed = set(methods) | ({"HEAD"} if "GET" in methods else set())
        table[path] = _Route(handler, frozenset(allowed))
    return table


class _ReadRequest(HttpRequest):
    """A Starlette request whose body was already read (``body()`` returns it at once);
    ``receive`` then only reports the client leaving."""

    def __init__(self, scope: Scope, receive: Receive, body: bytes) -> None:
        super().__init__(scope, receive)
        self._body = body


class LocalApp:
    """The whole server as one plain ASGI callable."""

    def __init__(self, ctx: ServerContext, *, api_key: str | None, max_body_bytes: int) -> None:
        self.ctx = ctx
        self.max_body_bytes = max_body_bytes
        self._expected = f"Bearer {api_key}".encode() if api_key else None
        self._routes = _table()

    def _authorized(self, scope: Scope) -> bool:
        if self._expected is None or scope["path"].startswith(_OPEN_PREFIXES):
            return True
        for name, value in scope["headers"]:
            if name == b"authorization":
                return hmac.compare_digest(value, self._expected)
        return False

    def _early_answer(self, scope: Scope) -> tuple[_Route | None, Response | None]:
        """The route, or the response that ends the request before its body is read."""
        method = scope["method"]
        if method != "OPTIONS" and not self._authorized(scope):
            return None, unauthorized()
        route = self._routes.get(scope["path"])
        if route is None:
            return None, http_error(404, "Not Found")
        if method not in route.methods:
            allow = ", ".join(sorted(route.methods))
            return None, http_error(405, "Method Not Allowed", headers={"Allow": allow})
        return route, None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return  # no lifespan (uvicorn runs with lifespan="off"), no websockets
        route, early = self._early_answer(scope)
        if route is None:
            assert early is not None
            await early(scope, receive, send)
            return
        try:
            body = await read_body(scope, receive, self.max_body_bytes)
        except BodyTooLarge as err:
            await too_large(str(err))(scope, receive, send)
            return
        except ClientGone:
            return
        try:
            response = await route.handler(_ReadRequest(scope, receive, body), self.ctx)
        except control.BodyError as err:
            response = err.response
        await response(scope, receive, send)


def build_app(
    ctx: ServerContext, *, api_key: str | None, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
) -> LocalApp:
    return LocalApp(ctx, api_key=api_key, max_body_bytes=max_body_bytes)
