"""Load user code named as ``file.py:Name`` (relative to the recipe) or ``package.module:Name``.

Recipes point at evaluators, workers, tools, dataset factories and algorithm hooks this way.

A file is imported as a module of a private package, one per folder: ``flaky_eval.py`` in
``/task`` becomes ``nexrl_user_<hash of /task>.flaky_eval``, so two recipes with an
``evaluator.py`` each do not collide. Code in that folder can import the folder's other modules
and packages as a script run from it could (``from evaluator import X``, ``import helpers.text``,
``from .evaluator import X``): those land in the same private package
(``nexrl_user_<hash>.evaluator``), never as top-level ``evaluator`` in :data:`sys.modules`, so
two runs in one process with different recipe folders see each their own ``evaluator``. A name
the folder does not hold (``json``, ``torch``) imports as usual. Only ``import`` statements in
the folder's modules are scoped (``importlib.import_module("evaluator")`` is not).
"""

from __future__ import annotations

import builtins
import hashlib
import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import re
import sys
import threading
import types
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from nexrl_async.core.errors import UserCodeError

PACKAGE_PREFIX = "nexrl_user_"
"""Private packages holding user modules are named ``nexrl_user_<hash of the folder>``."""


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


def folder_package(folder: Path) -> str:
    """The private package name the modules of ``folder`` are imported under."""
    digest = hashlib.sha1(str(folder.resolve()).encode()).hexdigest()[:12]
    return f"{PACKAGE_PREFIX}{digest}"


def _import_module(target: str, ref: str) -> Any:
    try:
        return importlib.import_module(target)
    except ImportError as err:
        raise UserCodeError(f"{ref!r}: cannot import module {target!r}: {err}") from err


def _import_file(file: Path, ref: str) -> Any:
    file = file.resolve()
    if not file.is_file():
        raise UserCodeError(f"{ref!r}: file {file} does not exist")
    scope = _scope(file.parent)
    stem = file.stem if file.stem.isidentifier() else re.sub(r"\W", "_", file.stem)
    module_name = f"{scope.package}.{stem}"
    with _LOCK:
        module = sys.modules.get(module_name)
        if module is not None and getattr(module, "__file__", None) == str(file):
            return module
        loader = _ScopedLoader(module_name, str(file), scope)
        spec = importlib.util.spec_from_file_location(module_name, file, loader=loader)
        if spec is None:
            raise UserCodeError(f"{ref!r}: cannot load {file} as a Python module")
        module = importlib.util.module_from_spec(spec)
        sys.modules[module_name] = module
        try:
            loader.exec_module(module)
        except (Exception, SystemExit, KeyboardInterrupt) as err:
            # ``sys.exit()`` or a stray KeyboardInterrupt at import time is a broken module, not a
            # request to end the engine with that code
            sys.modules.pop(module_name, None)
            raise UserCodeError(
                f"{ref!r}: importing {file} raised {type(err).__name__}: {err}"
            ) from err
    return module


_LOCK = threading.RLock()
"""Guards the scope registry and the first import of each file (one thread execs it)."""


class _Scope:
    """One folder's private package and the ``__builtins__`` its modules run with."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.package = folder_package(folder)
        self.builtins: dict[str, Any] = dict(vars(builtins))
        self.builtins["__import__"] = self._import
        self._provided: dict[str, bool] = {}

    def provides(self, top: str) -> bool:
        """Whether ``top`` is a module or package of the folder (``top.py``, ``top/``); looked
        up once per name (imports inside functions run often)."""
        found = self._provided.get(top)
        if found is None:
            folder = self.folder
            found = (folder / f"{top}.py").is_file() or (folder / top / "__init__.py").is_file()
            self._provided[top] = found
        return found

    def _import(
        self,
        name: str,
        globals_: Mapping[str, Any] | None = None,
        locals_: Mapping[str, Any] | None = None,
        fromlist: Sequence[str] = (),
        level: int = 0,
    ) -> types.ModuleType:
        top = name.partition(".")[0]
        if level != 0 or not top or not self.provides(top):
            return builtins.__import__(name, globals_, locals_, fromlist, level)
        module = builtins.__import__(f"{self.package}.{name}", globals_, locals_, fromlist, 0)
        if fromlist:
            return module
        return sys.modules[f"{self.package}.{top}"]


_SCOPES: dict[str, _Scope] = {}


def _scope(folder: Path) -> _Scope:
    """The scope of ``folder``, its package registered in :data:`sys.modules` (once)."""
    package = folder_package(folder)
    with _LOCK:
        scope = _SCOPES.get(package)
        if scope is None:
            scope = _SCOPES[package] = _Scope(folder.resolve())
        if package not in sys.modules:
            spec = importlib.machinery.ModuleSpec(package, None, is_package=True)
            spec.submodule_search_locations = [str(scope.folder)]
            module = importlib.util.module_from_spec(spec)
            module.__path__ = [str(scope.folder)]
            sys.modules[package] = module
        if _FINDER not in sys.meta_path:
            sys.meta_path.insert(0, _FINDER)
    return scope


class _ScopedLoader(importlib.machinery.SourceFileLoader):
    """Runs a user module with its folder's ``__builtins__`` (the scoped ``__import__``)."""

    def __init__(self, fullname: str, path: str, scope: _Scope) -> None:
        super().__init__(fullname, path)
        self.scope = scope

    def exec_module(self, module: types.ModuleType) -> None:
        module.__dict__["__builtins__"] = self.scope.builtins
        super().exec_module(module)


class _ScopedFinder(importlib.abc.MetaPathFinder):
    """Finds the modules of a private folder package, loading them with :class:`_ScopedLoader`."""

    def find_spec(
        self,
        fullname: str,
        path: Sequence[str] | None,
        target: types.ModuleType | None = None,
    ) -> importlib.machinery.ModuleSpec | None:
        if not fullname.startswith(PACKAGE_PREFIX) or "." not in fullname:
            return None
        scope = _SCOPES.get(fullname.partition(".")[0])
        if scope is None:
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is None or not isinstance(spec.loader, importlib.machinery.SourceFileLoader):
            return spec
        spec.loader = _ScopedLoader(fullname, str(spec.loader.path), scope)
        return spec


_FINDER = _ScopedFinder()
