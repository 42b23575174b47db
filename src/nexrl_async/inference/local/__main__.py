"""``python -m nexrl_async.inference.local --model DIR [--port N] ...``: run the local server.

The same options as ``nexrl-async serve``; flag names follow SGLang's where one exists
(``--model-path`` is accepted for ``--model``, ``--max-running-requests`` for ``--max-batch``).

``--wait-for-args`` alone: a *warm* server (``core/handover.py``). It imports the server stack,
then reads one JSON line from stdin, ``{"argv": [...], "log": "PATH"}``, sends its output to
the end of ``PATH`` and runs with ``argv``; it exits 0 at once when stdin closes
without a line (the run that started it ended).
"""

from __future__ import annotations

import argparse
import gc
import os
import sys

import msgspec

from nexrl_async.core.errors import NexRLError
from nexrl_async.core.handover import WAIT_FLAG, Handover
from nexrl_async.inference.local.http_io import DEFAULT_MAX_BODY_BYTES
from nexrl_async.inference.local.server import ServeOptions, main_serve


def parse_options(argv: list[str] | None = None) -> ServeOptions:
    parser = argparse.ArgumentParser(
        prog="python -m nexrl_async.inference.local",
        description="SGLang-compatible inference server on transformers (CPU or one GPU).",
    )
    arg = parser.add_argument
    arg("--model", "--model-path", dest="model_dir", required=True, help="local HF model folder")
    arg("--host", default="127.0.0.1")
    arg("--port", type=int, default=30000)
    arg("--api-key", default=None)
    arg("--max-batch", "--max-running-requests", dest="max_batch", type=int, default=64)
    arg("--device", choices=["auto", "cpu", "cuda"], default="cpu")
    arg("--dtype", choices=["auto", "float32", "bfloat16", "float16"], default="auto")
    arg("--weight-version", default="0")
    arg("--served-model-name", default=None)
    arg("--context-length", type=int, default=None)
    arg("--torch-threads", type=int, default=0)
    arg("--seed", "--random-seed", dest="seed", type=int, default=0)
    arg("--update-group-timeout-s", type=float, default=300.0, help="weight-update group deadline")
    arg("--max-body-bytes", type=int, default=DEFAULT_MAX_BODY_BYTES, help="larger bodies: 413")
    arg("--max-n", type=int, default=64, help="largest n (samples per prompt) of a request")
    arg("--max-request-sequences", type=int, default=4096, help="prompts x n per request")
    return ServeOptions(**vars(parser.parse_args(argv)))


def wait_for_args() -> list[str] | None:
    """Block until the handover line; redirect stdout and stderr to its log; its argv."""
    line = sys.stdin.buffer.readline()
    if not line.strip():
        return None
    handover = msgspec.json.decode(line, type=Handover)
    sys.stdout.flush()
    sys.stderr.flush()
    fd = os.open(handover.log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    return handover.argv


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv == [WAIT_FLAG]:
        # the imports' objects leave the collector's view now, while the run that started this
        # process still imports: the freeze after the model loads then has little left to walk
        gc.collect()
        gc.freeze()
        handed = wait_for_args()
        if handed is None:
            return 0
        argv = handed
    try:
        main_serve(parse_options(argv))
    except NexRLError as err:
        sys.stderr.write(f"error: {err}\n")
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
