"""A world-size-1 trainer in a process of its own (``trainer.process = true``).

```
trainer = RemoteTrainer.start(spec, log_file=run_dir / "logs" / "trainer.log")  # loop thread
trainer.wait_ready()                   # blocking: the process imported torch and built it
metrics = trainer.step(batch)          # blocking: the batch goes over a socket, metrics back
for name, tensor in trainer.named_parameters_for_sync(): ...   # views of shared memory
trainer.shutdown()
```

Why: in one process the trainer thread and the event loop take turns at Python's interpreter
lock, so a train step beside the rollouts takes (its own CPU + the loop's). In its own process
the step runs on another core while the loop serves rollouts. The engine sees the
:class:`~nexrl_async.core.protocols.PolicyTrainer` protocol either way.

The process is ``python -m nexrl_async.train.ranks.remote_main FD``
or a copy of the engine forked before its event loop started (:mod:`~nexrl_async.core.children`),
either dying with the thread that made it, so start it from a thread that lives as long as the
run (the engine's loop thread). Commands are the rank protocol's
(:mod:`~nexrl_async.train.ranks.commands`); weights come back through a shared-memory file
(:mod:`~nexrl_async.inference.staging`). An error raised in the process is raised here (its
own type when it unpickles, with the process's traceback as a note) and the process keeps
serving; a process that dies or does not answer within ``trainer.step_timeout_s`` fails this
call and every later one with :class:`~nexrl_async.core.errors.TrainError`.
"""

from __future__ import annotations

import subprocess
import threading
from collections.abc import Callable, Iterator
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any, NoReturn

import anyio
import anyio.lowlevel
import anyio.to_thread
from loguru import logger

from nexrl_async.core.children import TRAINER_MODULE, ChildProcess, spawn_child, take_child
from nexrl_async.core.errors import TrainError
from nexrl_async.core.records import TrainBatch
from nexrl_async.inference.staging import Layout, StagingReader
from nexrl_async.train.ranks.commands import (
    Command,
    CommandCalls,
    Shutdown,
    SyncWeights,
    TrainStep,
    describe,
    encode_batch,
    encode_command,
)
from nexrl_async.train.ranks.remote_protocol import Boot, Ready, Reply, raise_failure
from nexrl_async.train.spec import TrainerSpec

_BOOT_TIMEOUT_S = 600.0
_EXIT_GRACE_S = 30.0


class RemoteTrainer(CommandCalls):
    """Rank 0's handle on a trainer running in a child process (see the module docstring)."""

    def __init__(self, process: ChildProcess, conn: Connection, *, timeout_s: float) -> None:
        self._process = process
        self._conn = conn
        self._timeout_s = timeout_s
        self._lock = threading.Lock()
        self._ready: Ready | None = None
        self._steps_done = 0
        self._failure: TrainError | None = None
        self._closed = False
        self._staging = StagingReader()
        self._staged: Layout | None = None
        """The last train step's staging layout while no other command ran since."""

    @classmethod
    def start(
        cls,
        spec: TrainerSpec,
        *,
        log_level: str = "INFO",
        log_file: Path | None = None,
        stage_after_step: bool = False,
    ) -> RemoteTrainer:
        """Spawn the trainer process and send it ``spec`` (returns at once; see
        :meth:`wait_ready`). Call it from a thread that outlives the run. With
        ``stage_after_step`` every step also fills the staging file, so the
        :meth:`stage_weights` that follows costs no round trip."""
        child = take_child(TRAINER_MODULE)
        forked = child is not None
        child = child or spawn_child(TRAINER_MODULE)
        process = child.process
        conn = Connection(child.sock.detach())
        handle = cls(process, conn, timeout_s=spec.trainer.step_timeout_s)
        log = str(log_file) if log_file is not None else None
        boot = Boot(spec, log_level, log, stage_after_step=stage_after_step)
        try:
            conn.send(boot)
        except OSError as err:
            handle._fail(f"could not reach the trainer process: {err}")
        logger.info("trainer process {} (pid {})", "forked" if forked else "started", process.pid)
        return handle

    @property
    def pid(self) -> int:
        return self._process.pid

    def wait_ready(self, timeout_s: float = _BOOT_TIMEOUT_S) -> None:
        """Block until the process built its trainer; raises what building raised."""
        with self._lock:
            if self._ready is not None:
                return
            reply = self._receive(timeout_s, what="building the trainer")
            if isinstance(reply, Reply):
                self._kill()
                assert reply.error is not None
                raise_failure(reply.error, where="building the trainer")
            assert isinstance(reply, Ready)
            self._ready = reply
            self._steps_done = reply.steps_done

    # ---- PolicyTrainer ---------------------------------------------------------------------

    @property
    def tokenizer(self) -> Any:
        return self._built().tokenizer

    @property
    def context_length(self) -> int | None:
        return self._built().context_length

    @property
    def steps_done(self) -> int:
        return self._steps_done

    def named_parameters_for_sync(self) -> Iterator[tuple[str, Any]]:
        """``(HF name, tensor)`` per parameter: views of the shared staging file, valid until
        the next sync (read them first)."""
        return iter(self._staging.views(self.stage_weights()))

    @property
    def staged(self) -> Layout | None:
        """The layout the last train step staged (``stage_after_step``) while no other command
        ran since; it stays readable until the step after next (two staging files)."""
        return self._staged

    def stage_weights(self) -> Layout:
        """Copy the parameters into the shared staging file; its layout, which any process of
        this host can read until the next sync (the ``shared`` weight transport). Free right
        after a step that staged them (``stage_after_step``)."""
        if self._staged is not None:
            return self._staged
        layout = self._run(SyncWeights())
        assert isinstance(layout, Layout)
        return layout

    def shutdown(self) -> None:
        """Ask the process to exit and wait for it (killed after a grace period); idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            if self._failure is None and self._process.poll() is None:
                try:
                    self._conn.send_bytes(encode_command(Shutdown(reason="run ended")))
                    if self._conn.poll(_EXIT_GRACE_S):
                        self._conn.recv()
                except (OSError, EOFError):
                    pass
            self._conn.close()
            try:
                self._process.wait(_EXIT_GRACE_S)
            except subprocess.TimeoutExpired:
                logger.warning("trainer process {} did not exit; killing it", self.pid)
                self._kill()
            self._staging.close()

    # ---- internals ----------------------------------------------------------------------------

    def _built(self) -> Ready:
        if self._ready is None:
            self.wait_ready()
        assert self._ready is not None
        return self._ready

    async def step_async(
        self, batch: TrainBatch, *, on_sent: Callable[[], None] | None = None
    ) -> dict[str, float]:
        """:meth:`step` from the event loop, with no worker thread: the batch is sent from the
        loop and the reply awaited on the socket, so the loop resumes the caller as soon as the
        reply arrives (no thread to schedule, no interpreter-lock hand-over). Like a call in a
        worker thread it is not cancelled midway: a cancellation waits for the reply.
        ``on_sent`` is called once the batch is sent (before the reply)."""
        command = TrainStep(batch=encode_batch(batch))
        self._built()
        if not self._lock.acquire(blocking=False):  # a call from another thread is running
            if on_sent is not None:
                on_sent()
            result = await anyio.to_thread.run_sync(self._run, command)
        else:
            try:
                with anyio.CancelScope(shield=True):
                    result = await self._exchange_async(command, on_sent)
            finally:
                self._lock.release()
            await anyio.lowlevel.checkpoint_if_cancelled()  # then the cancellation, if any
        assert isinstance(result, dict)
        return result

    async def _exchange_async(
        self, command: Command, on_sent: Callable[[], None] | None = None
    ) -> object:
        what = self._send(command)
        if on_sent is not None:
            on_sent()
        with anyio.move_on_after(self._timeout_s) as waited:
            await anyio.wait_readable(self._conn.fileno())  # a reply, or the end of the socket
        if waited.cancelled_caught:
            self._kill()
            self._fail(f"the trainer process did not answer {what} within {self._timeout_s:.0f} s")
        return self._finish(self._receive(0.0, what=what), what)

    def _run(self, command: Command) -> object:
        self._built()
        with self._lock:
            what = self._send(command)
            return self._finish(self._receive(self._timeout_s, what=what), what)

    def _send(self, command: Command) -> str:
        """Send ``command`` (holding the lock); its short name."""
        what = describe(command)
        if self._failure is not None:
            raise TrainError(f"the trainer process stopped earlier: {self._failure}")
        if self._closed:
            raise TrainError("the trainer process was shut down")
        try:
            self._conn.send_bytes(encode_command(command))
        except OSError as err:
            self._fail(f"could not send {what} to the trainer process: {err}")
        return what

    def _finish(self, reply: object, what: str) -> object:
        assert isinstance(reply, Reply)
        self._steps_done = reply.steps_done
        self._staged = reply.staged  # any other command may change the parameters
        if reply.error is not None:
            raise_failure(reply.error, where=what)
        return reply.value

    def _receive(self, timeout_s: float, *, what: str) -> object:
        try:
            if not self._conn.poll(timeout_s):
                self._kill()
                self._fail(f"the trainer process did not answer {what} within {timeout_s:.0f} s")
            return self._conn.recv()
        except (EOFError, OSError) as err:
            try:
                code: int | None = self._process.wait(_EXIT_GRACE_S)
            except subprocess.TimeoutExpired:
                self._kill()
                code = self._process.returncode
            self._fail(f"the trainer process exited (code {code}) during {what}", cause=err)

    def _fail(self, message: str, *, cause: BaseException | None = None) -> NoReturn:
        self._failure = TrainError(message)
        raise self._failure from cause

    def _kill(self) -> None:
        if self._process.poll() is None:
            self._process.kill()
            self._process.wait()
