"""A zero-latency HTTP/1.1 server for client benchmarks: every request gets one fixed
``/generate`` answer in SGLang's shape (3 tokens, log-probs, a finish reason), at once.

It parses only what keep-alive needs (the header block and ``Content-Length``), so its own
CPU per request is a few microseconds and the client's cost is what a benchmark sees. Run::

    python benchmarks/zero_server.py --port 30000

It answers ``GET /health`` like any other request (200), so ``harness.server_process`` can
wait for it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Sequence

OUTPUT_IDS = [5, 6, 7]
BODY = json.dumps({
    "text": "",
    "output_ids": OUTPUT_IDS,
    "meta_info": {
        "id": "zero", "finish_reason": {"type": "length", "length": len(OUTPUT_IDS)},
        "prompt_tokens": 64, "completion_tokens": len(OUTPUT_IDS), "cached_tokens": 0,
        "weight_version": "0",
        "output_token_logprobs": [[-0.5, token, None] for token in OUTPUT_IDS],
        "e2e_latency": 0.0,
    },
}).encode()  # fmt: skip
RESPONSE = (
    b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: "
    + str(len(BODY)).encode()
    + b"\r\n\r\n"
    + BODY
)


class ZeroProtocol(asyncio.Protocol):
    """Answers each complete request on a connection with :data:`RESPONSE`."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.buffer = b""

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while (end := self.buffer.find(b"\r\n\r\n")) >= 0:
            head = self.buffer[:end].lower()
            at = head.find(b"content-length:")
            length = int(head[at + 15 :].split(b"\r\n", 1)[0]) if at >= 0 else 0
            if len(self.buffer) < end + 4 + length:
                return
            self.buffer = self.buffer[end + 4 + length :]
            self.transport.write(RESPONSE)


async def serve(host: str, port: int) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(ZeroProtocol, host, port)
    async with server:
        await server.serve_forever()


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args(argv)
    asyncio.run(serve(args.host, args.port))


def argv(port: int) -> list[str]:
    """The command line that starts this server on ``port``."""
    return [sys.executable, __file__, "--port", str(port)]


if __name__ == "__main__":
    main()
