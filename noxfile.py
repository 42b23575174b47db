"""Quality gates. Run all default sessions with ``nox``; one with ``nox -s lint``.

Sessions run in the current environment (the project's venv from the README), so nothing is
installed twice and torch stays the build you chose.
"""

from __future__ import annotations

import sys
from pathlib import Path

import nox

nox.options.default_venv_backend = "none"
nox.options.sessions = ["lint", "types", "arch", "tests"]
nox.options.error_on_missing_interpreters = False

PATHS = ["src", "tests", "benchmarks", "recipes", "noxfile.py"]
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
    for script in ("inference.py", "pipeline.py", "train_step.py"):
        session.run(PYTHON, f"benchmarks/{script}", *session.posargs)
