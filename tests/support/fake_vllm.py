"""A fake vLLM server for client tests: replays the shapes docs/vllm.md records from vLLM 0.32.0.

``FakeVLLM().transport()`` is an ``httpx.MockTransport``: no sockets, no model. Generation
makes token ``10 + j + t`` for choice ``j`` at step ``t`` with log-prob ``-0.5 - t``, reports
``weight_versions`` spans, and holds a request until aborted while ``hold`` is set. Every
request is recorded (``calls``: method, path, query, body).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import anyio
import httpx

URL = "http://vllm.fake"


@dataclass
class FakeVLLM:
    weight_version: str = "default"
    model: str = "/m"
    paused: bool = False
    hold: bool = False
    """Generation requests wait until aborted (``/abort_requests`` or ``/pause?mode=abort``)."""
    hold_tokens: int = 2
    """Tokens a held request has produced when it is aborted."""
    reset_ok: bool = True
    calls: list[tuple[str, str, dict[str, str], Any]] = field(default_factory=list)
    answer: dict[str, Any] | None = None
    """A canned ``/inference/v1/generate`` answer, replayed as is."""
    _aborts: dict[str, anyio.Event] = field(default_factory=dict)

    def transport(self) -> httpx.MockTransport:
        return httpx.MockTransport(self.handle)

    def paths(self) -> list[str]:
        return [path for _, path, _, _ in self.calls]

    def bodies(self, path: str) -> list[Any]:
        return [body for _, p, _, body in self.calls if p == path]

    async def handle(self, request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content) if request.content else None
        path, query = request.url.path, dict(request.url.params)
        self.calls.append((request.method, path, query, body))
        route = _ROUTES.get((request.method, path))
        if route is None:
            return httpx.Response(404, json={"detail": "Not Found"})
        return await route(self, query, body)

    async def _generate(self, query: dict[str, str], body: Any) -> httpx.Response:
        if self.answer is not None:
            return httpx.Response(200, json=self.answer)
        sampling = body["sampling_params"]
        if sampling.get("max_tokens") == 0:
            return _error(400, "max_tokens must be at least 1, got 0.")
        rid = "generate-tokens-" + body.get("request_id", "x")
        tokens = int(sampling.get("max_tokens") or 4)
        finish = "length"
        if self.hold:
            event = self._aborts.setdefault(rid, anyio.Event())
            await event.wait()
            tokens, finish = self.hold_tokens, "abort"
        n = int(sampling.get("n", 1))
        choices = [self._choice(j, tokens, finish, sampling) for j in range(n)]
        usage = {"prompt_tokens": len(body["token_ids"]), "completion_tokens": n * tokens}
        return httpx.Response(200, json={"request_id": rid, "choices": choices, "usage": usage})

    def _choice(self, j: int, tokens: int, finish: str, sampling: dict[str, Any]) -> Any:
        ids = [10 + j + t for t in range(tokens)]
        content = [{"token_id": i, "logprob": -0.5 - t, "rank": 1} for t, i in enumerate(ids)]
        spans = [{"version": self.weight_version, "start": 0, "end": tokens}] if tokens else []
        return {
            "index": j,
            "finish_reason": finish,
            "stop_reason": None,
            "token_ids": ids,
            "weight_versions": spans,
            "logprobs": {"content": content} if sampling.get("logprobs") is not None else None,
        }

    async def _pause(self, query: dict[str, str], body: Any) -> httpx.Response:
        self.paused = True
        if query.get("mode", "abort") == "abort":
            for event in self._aborts.values():
                event.set()
        return httpx.Response(200, json={"status": "paused"})

    async def _resume(self, query: dict[str, str], body: Any) -> httpx.Response:
        self.paused = False
        return httpx.Response(200, json={"status": "resumed"})

    async def _abort(self, query: dict[str, str], body: Any) -> httpx.Response:
        ids = body.get("request_ids") or list(self._aborts)
        for rid in ids:
            self._aborts.setdefault(rid, anyio.Event()).set()
        return httpx.Response(200, json={"status": "aborted", "aborted": len(ids)})

    async def _weight_info(self, query: dict[str, str], body: Any) -> httpx.Response:
        return httpx.Response(200, json={"weight_version": self.weight_version})

    async def _models(self, query: dict[str, str], body: Any) -> httpx.Response:
        return httpx.Response(200, json={"object": "list", "data": [{"id": self.model}]})

    async def _relabel(self, query: dict[str, str], body: Any) -> httpx.Response:
        self.weight_version = body["new_version"]
        return httpx.Response(200, json={"success": True, "new_version": self.weight_version})

    async def _rpc(self, query: dict[str, str], body: Any) -> httpx.Response:
        if body.get("method") != "reload_weights":
            return _error(500, f"'CPUWorker' object has no attribute {body.get('method')!r}")
        self.model = body["kwargs"]["weights_path"]
        return httpx.Response(200, json={"results": [None]})

    async def _reset(self, query: dict[str, str], body: Any) -> httpx.Response:
        return httpx.Response(200, json={"success": self.reset_ok})

    async def _health(self, query: dict[str, str], body: Any) -> httpx.Response:
        return httpx.Response(200)


def _error(status: int, message: str) -> httpx.Response:
    kind = "BadRequestError" if status == 400 else "InternalServerError"
    error = {"message": message, "type": kind, "param": None, "code": status}
    return httpx.Response(status, json={"error": error})


_ROUTES = {
    ("POST", "/inference/v1/generate"): FakeVLLM._generate,
    ("POST", "/pause"): FakeVLLM._pause,
    ("POST", "/resume"): FakeVLLM._resume,
    ("POST", "/abort_requests"): FakeVLLM._abort,
    ("GET", "/weight_info"): FakeVLLM._weight_info,
    ("GET", "/v1/models"): FakeVLLM._models,
    ("POST", "/update_weight_version"): FakeVLLM._relabel,
    ("POST", "/collective_rpc"): FakeVLLM._rpc,
    ("POST", "/reset_prefix_cache"): FakeVLLM._reset,
    ("GET", "/health"): FakeVLLM._health,
}
