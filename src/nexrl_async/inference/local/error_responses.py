"""SGLang's error responses, byte-for-byte in shape (docs/sglang_api.md §1 and §7).

| situation                                   | status | body                                   |
|---------------------------------------------|--------|----------------------------------------|
| ``/generate`` body fails the schema         | 400    | ``{"error": "<text>"}``                |
| ``/generate`` value error (sampling, length)| 400    | ``{"error": {"message": "<text>"}}``   |
| body not parseable or nested too deeply     | 400    | OpenAI-style envelope, type Bad Request |
| body over ``--max-body-bytes``              | 413    | envelope, type Request Entity Too Large |
| OpenAI route value error                    | 400    | envelope, type ``BadRequestError``     |
| missing / wrong API key                     | 401    | ``{"error": "Unauthorized"}``          |
| unknown route                               | 404    | ``{"detail": "Not Found"}``            |
| server shutting down                        | 503    | envelope, type ``503``                 |
"""

from __future__ import annotations

from typing import Any

import msgspec
from starlette.responses import Response


def json_response(
    content: Any, status_code: int = 200, headers: dict[str, str] | None = None
) -> Response:
    """A JSON response encoded with msgspec (non-finite floats become ``null``)."""
    return Response(
        msgspec.json.encode(content), status_code, headers, media_type="application/json"
    )


def schema_error(message: str) -> Response:
    return json_response({"error": message}, 400)


def native_error(status_code: int, message: str) -> Response:
    return json_response({"error": {"message": message}}, status_code)


def envelope(status_code: int, message: str, error_type: str) -> dict[str, Any]:
    return {
        "object": "error",
        "message": message,
        "type": error_type,
        "param": None,
        "code": status_code,
    }


def openai_error(status_code: int, message: str, error_type: str = "BadRequestError") -> Response:
    return json_response(envelope(status_code, message, error_type), status_code)


def unparseable_body(message: str) -> Response:
    return openai_error(400, message, "Bad Request")


def unavailable(message: str) -> Response:
    return openai_error(503, message, "503")


def too_large(message: str) -> Response:
    return openai_error(413, message, "Request Entity Too Large")


def unauthorized() -> Response:
    return json_response({"error": "Unauthorized"}, 401)


def http_error(status_code: int, detail: str, headers: dict[str, str] | None = None) -> Response:
    """FastAPI's default body for routing errors (404, 405)."""
    return json_response({"detail": detail}, status_code, headers)
