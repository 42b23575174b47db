"""The parent-death shim every child process of a run starts through (Linux).

A parent killed with SIGKILL runs no cleanup. So, on Linux, a child (a launched or warm
inference server, a trainer process) is spawned as ``python -I -S -c SHIM <parent pid>
<argv...>``: the shim sets ``PR_SET_PDEATHSIG`` (SIGKILL), exits if the parent already died,
then ``execvp``s the real command; the kernel kills the child when the spawning *thread* exits,
so spawn from a thread that lives as long as the run (the engine's loop thread).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence

# prctl(PR_SET_PDEATHSIG = 1, SIGKILL); exit if the parent already died; then exec the server.
_PDEATHSIG_SHIM = (
    "import ctypes,os,signal,sys\n"
    "ctypes.CDLL(None).prctl(1, int(signal.SIGKILL))\n"
    "if os.getppid() != int(sys.argv[1]):\n"
    "    os._exit(1)\n"
    "os.execvp(sys.argv[2], sys.argv[2:])\n"
)


def shimmed(argv: Sequence[str]) -> list[str]:
    """``argv`` behind the parent-death shim on Linux; as it is elsewhere."""
    if sys.platform != "linux":
        return list(argv)
    return [sys.executable, "-I", "-S", "-c", _PDEATHSIG_SHIM, str(os.getpid()), *argv]
