"""The trainer process: builds a world-size-1 trainer and serves the engine's commands.

:func:`serve_socket` runs in a child the engine forked before its event loop started, or in
``python -m nexrl_async.train.ranks.remote_main FD`` (:mod:`~nexrl_async.core.children`; ``FD``
is the child's end of a socket pair).

```
parent ── Boot(spec, log_level, log_file) ──▶  build Trainer.from_spec(spec)
       ◀── Ready(tokenizer, context_length, steps_done)   (or Reply(error=...))
       ── command (msgpack, train/ranks/commands) ──▶  execute(trainer, command)
       ◀── Reply(value, steps_done) | Reply(error=...)    ... until Shutdown or end of file
```

Replies are pickled. A ``SyncWeights`` command copies the parameters into the shared staging
file (:mod:`~nexrl_async.inference.staging`) and replies with its layout; with
``Boot.stage_after_step`` every train step does too (``Reply.staged``). A failing command
replies with the error (pickled when it can be, always with its type, text and traceback) and
the process keeps serving. It ignores SIGINT and SIGTERM and runs in a session of its own: the
parent decides when it stops (``Shutdown``, or closing the socket); the parent-death shim ends
it if the parent is killed.
"""

from __future__ import annotations

import os
import signal
import socket
import sys
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from loguru import logger
from transformers.utils import logging as hf_logging

from nexrl_async.core.process import exit_process_now
from nexrl_async.inference.staging import StagingWriter
from nexrl_async.obs.logs import setup_logging
from nexrl_async.train.ranks.commands import (
    RankHooks,
    Shutdown,
    SyncWeights,
    TrainStep,
    decode_command,
    describe,
    execute,
)
from nexrl_async.train.ranks.remote_protocol import Boot, Ready, Reply, failure_of
from nexrl_async.train.trainer import Trainer


@dataclass
class _Server:
    trainer: Trainer
    conn: Connection
    stage_after_step: bool = False
    staging: StagingWriter = field(default_factory=StagingWriter)

    def serve(self) -> int:
        hooks = RankHooks()
        while True:
            try:
                data = self.conn.recv_bytes()
            except (EOFError, OSError):
                logger.info("trainer process: the engine closed the channel; exiting")
                return 0

            command = decode_command(data)
            if isinstance(command, Shutdown):
                self.conn.send(Reply(steps_done=self.trainer.steps_done))
                return 0
            try:
                if isinstance(command, SyncWeights):
                    value: Any = self.staging.fill(self.trainer.named_parameters_for_sync())
                else:
                    value = execute(self.trainer, command, hooks)
                staged = None
                if self.stage_after_step and isinstance(command, TrainStep):
                    staged = self.staging.fill(self.trainer.named_parameters_for_sync())
                reply = Reply(value=value, steps_done=self.trainer.steps_done, staged=staged)
            except Exception as err:  # noqa: BLE001 - sent to the engine, which raises it
                logger.debug("trainer process: {} failed: {!r}", describe(command), err)
                reply = Reply(steps_done=self.trainer.steps_done, error=failure_of(err))
            self.conn.send(reply)


def _log(boot: Boot) -> None:
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    hf_logging.disable_progress_bar()
    setup_logging(level=boot.log_level)
    if boot.log_file is not None:
        Path(boot.log_file).parent.mkdir(parents=True, exist_ok=True)
        logger.add(boot.log_file, level=boot.log_level, mode="a", colorize=False)


def serve_socket(fd: int) -> int:
    """Serve the engine on socket ``fd`` until ``Shutdown`` or end of file; the exit code."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    conn = Connection(fd)
    try:
        boot: Boot = conn.recv()
    except (EOFError, OSError):
        return 0  # a warm process the engine never took
    _log(boot)
    try:
        trainer = Trainer.from_spec(boot.spec)
    except Exception as err:  # noqa: BLE001 - reported to the engine
        conn.send(Reply(error=failure_of(err)))
        return 1
    conn.send(Ready(trainer.tokenizer, trainer.context_length, trainer.steps_done))
    # staged after each step: two files, so servers may still copy one version while the
    # next step writes the other
    staging = StagingWriter(buffers=2 if boot.stage_after_step else 1)
    server = _Server(trainer, conn, stage_after_step=boot.stage_after_step, staging=staging)
    try:
        return server.serve()
    finally:
        server.staging.close()


if __name__ == "__main__":
    code = serve_socket(socket.socket(fileno=int(sys.argv[1])).detach())
    # skip the interpreter's teardown of torch and transformers (a second or more): nothing is
    # left to flush but the standard streams (the log sinks flush every record)
    exit_process_now(code)
