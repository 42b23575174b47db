"""The namespace jail of :mod:`nexrl_async.rollout.sandbox`: one bubblewrap (``bwrap``) launch.

The program gets its own user, PID, mount, network, IPC, UTS and cgroup namespaces. Its root is
an empty tmpfs holding read-only binds of the system folders (``/usr``, ``/lib*``, ``/bin``) and
of the interpreter (the venv and its base prefix, at their own paths), a fresh ``/proc`` (only
its own processes), a minimal ``/dev``, and one writable place: ``WORKDIR``, a tmpfs capped at
``disk_mb`` (``/tmp`` points there; being memory, a program may hold ``memory_mb + disk_mb``).
Nothing else of the host is visible; without ``network`` there is only a loopback device of its
own. No ``/dev/shm`` is writable, so ``multiprocessing`` locks do not work.

The boot script runs as PID 1 of the namespace (``--as-pid-1``): it forks the program, reaps
whatever the program leaves behind and reports how the program ended through a status pipe
(bwrap itself folds a signal into ``128 + n``). When PID 1 exits, the kernel kills every process
left in the namespace, double-forked ``setsid`` ones included; ``--die-with-parent`` does the
same when the engine or bwrap dies.

Process count: ``RLIMIT_NPROC`` counts per user and per user namespace, and the kernel does not
apply it to processes of host root. A non-root engine's program runs as the engine's uid in
bwrap's own user namespace (``--disable-userns`` stops it making more), where the count starts
from zero. A root engine has bwrap wait (``--userns-block-fd``) while it writes the namespace's
id maps itself: uid 0 inside is host root, for bwrap's setup and the PID-1 boot (whose only
capabilities, inside the namespace, are ``_CAPS``), and ``SANDBOX_UID`` inside is ``HOST_UID``
(``nobody``) outside. The boot sets ``user.max_user_namespaces = 0`` and the program switches to
``SANDBOX_UID`` before it starts, so the limit holds and the program has no capability at all.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import select
import shutil
import subprocess
import sys
from collections.abc import Sequence
from types import TracebackType
from typing import Any

import anyio
from anyio.abc import Process

WORKDIR = "/sandbox"
"""The program's working folder inside the jail: a size-capped tmpfs, its only writable place."""
SANDBOX_UID = 1000
"""The program's uid and gid inside the jail when the engine runs as root."""
HOST_UID = 65534
"""What ``SANDBOX_UID`` is on the host (``nobody``) when the engine runs as root."""

_SYSTEM = ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32")
_LOADER = ("/etc/ld.so.cache", "/etc/ld.so.conf", "/etc/ld.so.conf.d")
_NETWORK = (
    "/etc/resolv.conf",
    "/etc/hosts",
    "/etc/nsswitch.conf",
    "/etc/ssl",
    "/etc/ca-certificates",
)
_CAPS = ("CAP_SETUID", "CAP_SETGID", "CAP_SYS_RESOURCE")
"""What a root engine's boot keeps inside the namespace until the program drops to SANDBOX_UID."""
_HANDSHAKE_S = 10.0
_PROBE_S = 30.0

BOOT = """\
import json, os, resource, signal, sys, traceback
cfg = json.loads(sys.argv[1])

def run():
    if cfg.get("uid") is not None:  # a root engine's jail: become nobody, with no capability
        os.setgroups([])
        os.setgid(cfg["uid"])
        os.setuid(cfg["uid"])
    for name, value in cfg["limits"].items():
        if value is not None:
            hard = value + 1 if name == "RLIMIT_CPU" else value
            resource.setrlimit(getattr(resource, name), (value, hard))
    sys.argv = ["main.py"]
    with open("main.py", encoding="utf-8") as f:
        source = f.read()
    try:
        exec(compile(source, "main.py", "exec"), {"__name__": "__main__", "__file__": "main.py"})
    except SystemExit:
        raise
    except BaseException as err:  # the program's own traceback, without this bootstrap's frame
        traceback.print_exception(type(err), err, err.__traceback__.tb_next)
        sys.exit(1)

def supervise(status_fd):  # PID 1 of the jail: run the program, reap orphans, report its end
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if cfg.get("uid") is not None:
        with open("/proc/sys/user/max_user_namespaces", "w") as f:
            f.write("0")
    child = os.fork()
    if child == 0:
        os.close(status_fd)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        run()
        sys.exit(0)
    pid = 0
    while pid != child:
        pid, status = os.waitpid(-1, 0)
    os.write(status_fd, str(os.waitstatus_to_exitcode(status)).encode())

if cfg.get("status_fd") is None:
    run()
else:
    supervise(cfg["status_fd"])
"""
"""The boot of both isolations: ``python -I -c BOOT <json>``; with a ``status_fd`` it is PID 1."""


def bwrap() -> str | None:
    """The ``bwrap`` executable, or ``None`` when it is not installed."""
    return shutil.which("bwrap")


def as_root() -> bool:
    """The engine runs as root: the jail maps its own ids and the program drops to nobody."""
    return os.geteuid() == 0


class Jail:
    """The descriptors and command line of one launch; a context manager that closes them.

    ``argv`` and ``pass_fds`` go to the process launcher; call :meth:`started` (or
    :meth:`started_blocking`) once it runs, and :meth:`exit_code` after it ended.
    """

    def __init__(
        self, code: str, boot: str, config: dict[str, Any], *, network: bool, disk_mb: int
    ) -> None:
        self._root = as_root()
        self.cwd: str | None = None  # bwrap sets the working folder inside the jail
        self._code = os.memfd_create("main.py")
        os.write(self._code, code.encode())
        os.lseek(self._code, 0, os.SEEK_SET)
        self._status_r, self._status_w = os.pipe()
        self._info_r, self._info_w = os.pipe() if self._root else (-1, -1)
        self._block_r, self._block_w = os.pipe() if self._root else (-1, -1)
        ids = {"uid": SANDBOX_UID if self._root else None, "status_fd": self._status_w}
        boot_arg = json.dumps({**config, **ids})
        self.argv = [*self._jail_args(network, disk_mb), sys.executable, "-I", "-c", boot, boot_arg]
        self.env = environment(WORKDIR)
        child_ends = (self._code, self._status_w, self._info_w, self._block_r)
        self.pass_fds: Sequence[int] = tuple(fd for fd in child_ends if fd >= 0)
        self._open = {self._status_r, self._info_r, self._block_w, *self.pass_fds} - {-1}

    def __enter__(self) -> Jail:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, err: BaseException | None, tb: TracebackType | None
    ) -> None:
        for fd in list(self._open):
            self._close(fd)

    def _jail_args(self, network: bool, disk_mb: int) -> list[str]:
        args = [bwrap() or "bwrap", "--unshare-all", "--unshare-user", "--die-with-parent"]
        args += ["--new-session", "--as-pid-1"]
        if network:
            args.append("--share-net")
        if self._root:
            args += ["--userns-block-fd", str(self._block_r), "--info-fd", str(self._info_w)]
            args += [arg for cap in _CAPS for arg in ("--cap-add", cap)]
        else:
            args.append("--disable-userns")
        args += filesystem_args(network)
        args += ["--perms", "0777", "--size", str(disk_mb * 2**20), "--tmpfs", WORKDIR]
        args += ["--perms", "0644", "--file", str(self._code), f"{WORKDIR}/main.py"]
        args += ["--symlink", WORKDIR, "/tmp", "--chdir", WORKDIR, "--clearenv"]
        for name, value in environment(WORKDIR).items():
            args += ["--setenv", name, value]
        return args

    async def started(self, process: Process) -> None:
        """Hand the descriptors over; a root engine writes the id maps bwrap waits for."""
        del process
        self._close_child_ends()
        if not self._root:
            return
        with anyio.move_on_after(_HANDSHAKE_S):
            info = bytearray()
            os.set_blocking(self._info_r, False)
            while chunk := await _read_when_ready(self._info_r):
                info.extend(chunk)
            self._map_ids(bytes(info))

    def started_blocking(self) -> None:
        """:meth:`started` for a process started with :mod:`subprocess` (the probe)."""
        self._close_child_ends()
        if not self._root:
            return
        info = bytearray()
        while select.select([self._info_r], [], [], _HANDSHAKE_S)[0]:
            chunk = os.read(self._info_r, 4096)
            if not chunk:
                break
            info.extend(chunk)
        self._map_ids(bytes(info))

    def exit_code(self, returncode: int | None) -> int | None:
        """The program's exit status as PID 1 reported it; bwrap's own if it never got that far."""
        os.set_blocking(self._status_r, False)
        try:
            reported = os.read(self._status_r, 64).decode().strip()
        except (BlockingIOError, UnicodeDecodeError):
            reported = ""
        return int(reported) if reported.lstrip("-").isdigit() else returncode

    def _close_child_ends(self) -> None:
        for fd in self.pass_fds:
            self._close(fd)
        self.pass_fds = ()

    def _close(self, fd: int) -> None:
        """Close one of ours exactly once (a second close could hit a reused number)."""
        if fd in self._open:
            self._open.discard(fd)
            with contextlib.suppress(OSError):
                os.close(fd)

    def _map_ids(self, info: bytes) -> None:
        """Map uid/gid 0 to host root (bwrap's setup) and SANDBOX_UID to HOST_UID, then go on."""
        try:
            child = int(json.loads(info)["child-pid"])
        except (ValueError, KeyError, TypeError):
            return  # bwrap failed before it started the namespace; its stderr says why
        mapping = f"0 0 1\n{SANDBOX_UID} {HOST_UID} 1\n"
        try:
            for name in ("uid_map", "gid_map"):
                with open(f"/proc/{child}/{name}", "w", encoding="ascii") as f:
                    f.write(mapping)
        except OSError:
            return  # closing the block pipe unblocks bwrap, which then fails on the missing map
        os.write(self._block_w, b"1")


def environment(work: str) -> dict[str, str]:
    """Nothing of the engine's environment but a PATH; HOME and TMPDIR point at the folder."""
    return {
        "PATH": os.defpath,
        "HOME": work,
        "TMPDIR": work,
        "LANG": "C.UTF-8",
        "PYTHONIOENCODING": "utf-8",
        "OMP_NUM_THREADS": "1",
    }


def filesystem_args(network: bool) -> list[str]:
    """Read-only system folders and interpreter, fresh ``/proc`` and ``/dev``."""
    args: list[str] = []
    for path in _SYSTEM:
        if os.path.islink(path):
            args += ["--symlink", os.readlink(path), path]
        elif os.path.isdir(path):
            args += ["--ro-bind", path, path]
    made: set[str] = set()
    for path in _LOADER + (_NETWORK if network else ()):
        if os.path.exists(path):
            args += [*_parents(path, made), "--ro-bind", path, path]
    for path in interpreter_paths():
        args += [*_parents(path, made), "--ro-bind", path, path]
    return [*args, "--proc", "/proc", "--dev", "/dev"]


def interpreter_paths() -> list[str]:
    """The interpreter's folders outside the system ones: the venv, its base prefix, both real."""
    exe_home = os.path.dirname(os.path.dirname(os.path.realpath(sys.executable)))
    paths = {sys.prefix, sys.base_prefix, exe_home}
    paths |= {os.path.realpath(p) for p in paths}
    system = tuple(f"{p}/" for p in _SYSTEM)
    kept = sorted(p for p in paths if not f"{p}/".startswith(system) and os.path.isdir(p))
    return [p for p in kept if not any(p.startswith(f"{other}/") for other in kept)]


def _parents(path: str, made: set[str]) -> list[str]:
    """``--dir`` for each missing ancestor, world-searchable (bwrap copies a private mode)."""
    args: list[str] = []
    parts = path.strip("/").split("/")[:-1]
    for i in range(len(parts)):
        parent = "/" + "/".join(parts[: i + 1])
        if parent not in made:
            made.add(parent)
            args += ["--perms", "0755", "--dir", parent]
    return args


async def _read_when_ready(fd: int) -> bytes:
    """The next bytes of a non-blocking pipe (empty at its end)."""
    while True:
        await anyio.wait_readable(fd)
        try:
            return os.read(fd, 4096)
        except BlockingIOError:
            continue


def isolation_available() -> bool:
    """Whether the ``"namespaces"`` isolation works here (tried once: a real jailed no-op)."""
    return isolation_problem() is None


@functools.cache
def isolation_problem() -> str | None:
    """Why the ``"namespaces"`` isolation does not work here, or ``None`` when it does.

    Blocking (up to a few seconds, once per process); async callers use a worker thread.
    """
    if bwrap() is None:
        return "bwrap (bubblewrap) is not installed"
    try:
        return _probe()
    except OSError as err:
        return f"a jailed no-op could not start: {err}"


def _probe() -> str | None:
    config = {"limits": {"RLIMIT_NPROC": 8, "RLIMIT_AS": 256 * 2**20}}
    with Jail("print('ok')", BOOT, config, network=False, disk_mb=1) as jail:
        child = subprocess.Popen(
            jail.argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=jail.env,
            pass_fds=jail.pass_fds,
            start_new_session=True,
        )
        with child:
            jail.started_blocking()
            try:
                out, err = child.communicate(timeout=_PROBE_S)
            except subprocess.TimeoutExpired:
                child.kill()
                return f"a jailed no-op did not finish in {_PROBE_S:.0f} s"
        code = jail.exit_code(child.returncode)
    if code == 0 and out == b"ok\n":
        return None
    reason = err.decode(errors="replace").strip().splitlines() or [f"exit code {code}"]
    return f"a jailed no-op failed: {reason[-1]}"
