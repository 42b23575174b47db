"""Reading request bodies within a size limit, and decoding them without recursion errors.

The body is read once, before any handler runs: a declared ``Content-Length`` over the limit is
refused without reading a byte, a chunked body as soon as it passes the limit (413). The
handler gets it with the request; ``receive`` then only reports the client leaving.
"""

from __future__ import annotations

from typing import TypeVar

import msgspec
from starlette.types import Receive, Scope

T = TypeVar("T")

DEFAULT_MAX_BODY_BYTES = 8 * 2**20
"""Request bodies above this are refused with 413 (``--max-body-bytes``)."""


class BodyTooLarge(Exception):
    """The body is (or declares itself) larger than the limit."""

    def __init__(self, size: int, limit: int, *, declared: bool) -> None:
        self.limit = limit
        if declared:
            what = f"The request body ({size} bytes)"
        else:
            what = f"The request body (over {limit} bytes so far)"
        super().__init__(f"{what} is larger than the server's limit of {limit} bytes.")


class ClientGone(Exception):
    """The client disconnected before its body was complete."""


class JsonError(ValueError):
    """A body that is not valid JSON, nests too deeply, or does not match the schema."""


def _declared_length(scope: Scope) -> int | None:
    for name, value in scope["headers"]:
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


async def read_body(scope: Scope, receive: Receive, limit: int) -> bytes:
    """The whole body; raises :class:`BodyTooLarge` or :class:`ClientGone`."""
    declared = _declared_length(scope)
    if declared is not None and declared > limit:
        raise BodyTooLarge(declared, limit, declared=True)
    message = await receive()
    if message["type"] == "http.disconnect":
        raise ClientGone
    body: bytes = message.get("body", b"")
    if not message.get("more_body", False):  # the usual case: one message
        if len(body) > limit:
            raise BodyTooLarge(len(body), limit, declared=False)
        return body
    chunks, size = [body], len(body)
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientGone
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise BodyTooLarge(size, limit, declared=False)
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


def decode_json(raw: bytes, kind: type[T]) -> T:
    """``raw`` decoded into ``kind``; :class:`JsonError` for anything a client got wrong.

    msgspec stops at Python's recursion limit with a ``RecursionError`` (it does not overflow
    the C stack): a too-deeply-nested body is the client's fault like a malformed one.
    """
    try:
        return msgspec.json.decode(raw, type=kind)
    except (msgspec.DecodeError, msgspec.ValidationError) as err:
        raise JsonError(str(err)) from err
    except RecursionError as err:
        raise JsonError("JSON is malformed: nested too deeply") from err
