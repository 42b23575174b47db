"""Response bodies of the simulated SGLang server, shaped like SGLang's (docs/sglang_api.md §7)."""

from __future__ import annotations

from typing import Any

import msgspec
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response

_GATEWAY_TEXT = {502: "Bad Gateway", 504: "Gateway Timeout"}


def json_response(content: Any, status_code: int = 200) -> Response:
    return Response(
        msgspec.json.encode(content), status_code=status_code, media_type="application/json"
    )


def value_error(message: str, status_code: int = 400) -> Response:
    """A ValueError in a native route: ``{"error": {"message": ...}}``."""
    return json_response({"error": {"message": message}}, status_code)


def schema_error(message: str) -> Response:
    """The 0.5.23 ``/generate`` schema gate: ``{"error": "<text>"}``."""
    return json_response({"error": message}, 400)


def bad_request(message: str) -> Response:
    """A body that cannot be parsed into the request model (FastAPI 422 remapped to 400)."""
    return json_response(
        {"object": "error", "message": message, "type": "Bad Request", "param": None, "code": 400},
        400,
    )


def success(ok: bool, message: str, status_code: int | None = None, **extra: Any) -> Response:
    """``{success, message}`` of the weight and group endpoints (400 when not ok)."""
    status = status_code if status_code is not None else (200 if ok else 400)
    return json_response({"success": ok, "message": message, **extra}, status)


def fault_response(status_code: int) -> Response:
    """An injected failure: SGLang's 503 envelope, a proxy's plain text for 502/504."""
    if status_code in _GATEWAY_TEXT:
        return PlainTextResponse(_GATEWAY_TEXT[status_code], status_code=status_code)
    message = "Simulated failure: the request waited too long and was aborted."
    return json_response(
        {
            "object": "error",
            "message": message,
            "type": str(status_code),
            "param": None,
            "code": status_code,
        },
        status_code,
    )


def unauthorized() -> Response:
    return json_response({"error": "Unauthorized"}, 401)


def not_found() -> Response:
    return json_response({"detail": "Not Found"}, 404)


async def read_json(request: Request) -> Any:
    """The decoded body (``{}`` when empty), or a 400 response when it is not JSON."""
    raw = await request.body()
    if not raw.strip():
        return {}
    try:
        return msgspec.json.decode(raw)
    except msgspec.DecodeError as err:
        return bad_request(f"JSON decode error: {err}")
