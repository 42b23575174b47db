"""Load user code named as ``file.py:Name`` (relative to the recipe) or ``package.module:Name``.

Recipes point at evaluators, workers, tools, dataset factories and algorithm hooks this way.
The file is imported under a private module name so two recipes with an ``evaluator.py`` each
do not collide.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import sys
from pathlib import Path
from typing import Any

from nexrl_async.core.errors import UserCodeError


def split_ref(ref: str) -> tuple[str, str]:
    """Split ``"file.py:Name"`` into its two halves, or raise :class:`UserCodeError`."""
    target, sep, name = ref.rpartition(":")
    if not sep or not target or not name.isidentifier():
        raise UserCodeError(f"{ref!r} is not of the form 'file.py:Name' or 'module:Name'")
    return target, name


def ref_file(ref: str, base_dir: Path) -> Path | None:
    """The file a ``file.py:Name`` ref points at (``None`` for ``module:Name`` refs)."""
    target, _ = split_ref(ref)
    if not target.endswith(".py"):
        return None
    path = Path(target)
    return path if path.is_absolute() else (base_dir / path)


def load_object(ref: str, base_dir: Path) -> Any:
    """Import the object ``ref`` names. Errors name the ref and what went wrong."""
    target, name = split_ref(ref)
    file = ref_file(ref, base_dir)
    module = _import_file(file, ref) if file is not None else _import_module(target, ref)
    try:
        return getattr(module, name)
    except AttributeError:
        raise UserCodeError(f"{ref!r}: {target} has no attribute {name!r}") from None


def _import_module(target: str, ref: str) -> Any:
    try:
        return importlib.import_module(target)
    except ImportError as err:
        raise UserCodeError(f"{ref!r}: cannot import module {target!r}: {err}") from err


def _import_file(file: Path, ref: str) -> Any:
    file = file.resolve()
    if not file.is_file():
        raise UserCodeError(f"{ref!r}: file {file} does not exist")
    digest = hashlib.sha1(str(file).encode()).hexdigest()[:12]
    module_name = f"nexrl_user_{file.stem}_{digest}"
    if module_name in sys.modules:
        return sys.modules[module_name]
    spec = importlib.util.spec_from_file_location(module_name, file)
    if spec is None or spec.loader is None:
        raise UserCodeError(f"{ref!r}: cannot load {file} as a Python module")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    try:
        spec.loader.exec_module(module)
    except (Exception, SystemExit, KeyboardInterrupt) as err:
        # ``sys.exit()`` or a stray KeyboardInterrupt at import time is a broken module, not a
        # request to end the engine with that code
        del sys.modules[module_name]
        raise UserCodeError(
            f"{ref!r}: importing {file} raised {type(err).__name__}: {err}"
        ) from err
    return module
