"""What every benchmark script shares: server subprocesses, result files, summary tables.

Benchmarks are scripts (``python benchmarks/<name>.py``), so this module is imported by its
plain name from the scripts' folder. Each script writes ``<out_dir>/<name>.json`` and
``<out_dir>/<name>.png`` (``benchmarks/results/`` by default, gitignored).
"""

from __future__ import annotations

import json
import math
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

RESULTS_DIR = Path(__file__).resolve().parent / "results"
"""Default output folder (gitignored)."""


def free_port() -> int:
    """A TCP port that was free a moment ago on 127.0.0.1."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class ServerProcess:
    """A server started by :func:`server_process`; ``url`` is its base URL."""

    process: subprocess.Popen[bytes]
    url: str
    log_path: Path

    def log_tail(self, lines: int = 20) -> str:
        try:
            text = self.log_path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])


@contextmanager
def server_process(
    argv: Sequence[str],
    *,
    port: int,
    log_path: Path,
    ready_timeout_s: float = 120.0,
    env: dict[str, str] | None = None,
) -> Iterator[ServerProcess]:
    """Start ``argv`` (a server listening on ``port``), wait for ``GET /health`` = 200, yield
    it, and stop it by its handle on exit (SIGTERM, then SIGKILL after 10 s)."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    with log_path.open("wb") as sink:
        process = subprocess.Popen(list(argv), stdout=sink, stderr=subprocess.STDOUT, env=full_env)
    server = ServerProcess(process, f"http://127.0.0.1:{port}", log_path)
    try:
        _wait_healthy(server, ready_timeout_s)
        yield server
    finally:
        stop_process(process)


def _wait_healthy(server: ServerProcess, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    with httpx.Client(timeout=2.0) as http:
        while time.monotonic() < deadline:
            if server.process.poll() is not None:
                raise RuntimeError(
                    f"server exited with {server.process.returncode}:\n{server.log_tail()}"
                )
            try:
                if http.get(f"{server.url}/health").status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.1)
    raise TimeoutError(f"{server.url} not healthy after {timeout_s} s:\n{server.log_tail()}")


def stop_process(process: subprocess.Popen[bytes], grace_s: float = 10.0) -> None:
    """SIGTERM, wait ``grace_s``, then SIGKILL: never leaves the process behind."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=5)


def simulated_server_argv(port: int, **options: float | int | str) -> list[str]:
    """``python -m nexrl_async.testing.simulated`` with ``--key value`` per option
    (underscores become dashes)."""
    argv = [sys.executable, "-m", "nexrl_async.testing.simulated", "--port", str(port)]
    for key, value in options.items():
        argv += [f"--{key.replace('_', '-')}", str(value)]
    return argv


def mean(values: Sequence[float]) -> float:
    return statistics.fmean(values) if values else math.nan


def stdev(values: Sequence[float]) -> float:
    return statistics.stdev(values) if len(values) > 1 else 0.0


def machine() -> dict[str, Any]:
    """Where the numbers were taken (they depend on it)."""
    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "load_avg": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }


def write_json(out_dir: Path, name: str, data: dict[str, Any]) -> Path:
    """``<out_dir>/<name>.json`` (NaN written as null)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}.json"
    path.write_text(json.dumps(_finite(data), indent=2) + "\n", encoding="utf-8")
    return path


def _finite(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


def save_figure(fig: Any, out_dir: Path, name: str) -> Path:
    """Save a matplotlib figure as ``<out_dir>/<name>.png`` and close it."""
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}.png"
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A plain-text table; floats get 3 significant decimals."""
    cells = [[_cell(v) for v in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(headers)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(c.rjust(w) for c, w in zip(row, widths, strict=True)) for row in cells]
    return "\n".join(lines)


def _cell(value: Any) -> str:
    if isinstance(value, float):
        if not math.isfinite(value):
            return "-"
        return f"{value:.3f}" if abs(value) < 1000 else f"{value:.0f}"
    return str(value)


def use_agg_backend() -> None:
    """Headless plotting (no display on benchmark machines)."""
    import matplotlib

    matplotlib.use("Agg")
