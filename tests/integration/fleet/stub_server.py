"""A tiny stdlib HTTP server the fleet tests launch through the ``command`` template.

Routes: ``GET /health`` and ``/health_generate`` → 200 (``--no-health-generate``: 404),
``GET /slow`` → sleeps 60 s then 200. Flags make it misbehave on purpose: ``--ignore-term``
(ignores SIGTERM), ``--child-pid-file F`` (forks a ``sleep`` child in its process group and
writes the child's pid to F), ``--startup-delay S``.

Run: ``python tests/integration/fleet/stub_server.py --host 127.0.0.1 --port 8000``
"""

from __future__ import annotations

import argparse
import signal
import subprocess
import sys
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path


class Handler(BaseHTTPRequestHandler):
    health_generate = True

    def do_GET(self) -> None:
        if self.path == "/health":
            self._reply(200)
        elif self.path == "/health_generate":
            self._reply(200 if self.health_generate else 404)
        elif self.path == "/slow":
            time.sleep(60)
            self._reply(200)
        else:
            self._reply(404)

    def _reply(self, status: int) -> None:
        self.send_response(status)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: object) -> None:
        sys.stderr.write(f"stub: {format % args}\n")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--host", required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--ignore-term", action="store_true")
    parser.add_argument("--no-health-generate", action="store_true")
    parser.add_argument("--child-pid-file", type=Path)
    parser.add_argument("--startup-delay", type=float, default=0.0)
    args = parser.parse_args()
    if args.ignore_term:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if args.child_pid_file is not None:
        child = subprocess.Popen(["sleep", "60"])
        args.child_pid_file.write_text(str(child.pid))
    time.sleep(args.startup_delay)
    Handler.health_generate = not args.no_health_generate
    server = ThreadingHTTPServer((args.host, args.port), Handler)
    server.daemon_threads = True
    print(f"stub server on {args.host}:{args.port}", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
