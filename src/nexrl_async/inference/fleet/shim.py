"""The parent-death shim every launched or warm server starts through (Linux).

A parent killed with SIGKILL runs no cleanup. So, on Linux, a server is spawned as ``python -I
-S -c SHIM <parent pid> <argv...>``: the shim sets ``PR_SET_PDEATHSIG`` (SIGKILL), exits if
the parent already died, then ``execvp``s the real command; the kernel kills the server when
the spawning *thread* exits (see :mod:`~nexrl_async.inference.fleet.launch`).
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
