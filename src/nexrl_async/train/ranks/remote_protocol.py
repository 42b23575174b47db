"""The messages between the engine and its trainer process (pickled; see
:mod:`~nexrl_async.train.ranks.remote_main` for the exchange). Commands themselves are the rank
protocol's msgspec structs (:mod:`~nexrl_async.train.ranks.commands`)."""

from __future__ import annotations

import pickle
import traceback
from dataclasses import dataclass
from typing import Any, NoReturn

from nexrl_async.core.errors import TrainError
from nexrl_async.train.spec import TrainerSpec


@dataclass(frozen=True)
class Boot:
    """The first message: what to build and where to log."""

    spec: TrainerSpec
    log_level: str = "INFO"
    log_file: str | None = None
    stage_after_step: bool = False
    """Fill the staging file after every train step (its layout rides on the step's reply:
    the ``shared`` weight transport then publishes without a second round trip)."""


@dataclass(frozen=True)
class Ready:
    """The trainer is built: what the engine reads of it without a command."""

    tokenizer: Any
    context_length: int | None
    steps_done: int


@dataclass(frozen=True)
class Failure:
    """An error raised in the trainer process."""

    type_name: str
    message: str
    traceback: str
    pickled: bytes | None = None


@dataclass(frozen=True)
class Reply:
    """The result of one command (``error`` set when it raised)."""

    value: Any = None
    steps_done: int = 0
    error: Failure | None = None
    staged: Any = None
    """A train step's staging layout (``Boot.stage_after_step``)."""


def failure_of(err: BaseException) -> Failure:
    pickled: bytes | None
    try:
        pickled = pickle.dumps(err)
        pickle.loads(pickled)  # the error must also load on the engine's side
    except (pickle.PicklingError, pickle.UnpicklingError, TypeError, AttributeError):
        # unpicklable errors (or ones whose class cannot rebuild them) travel as text
        pickled = None
    text = "".join(traceback.format_exception(err))
    return Failure(type(err).__name__, str(err), text, pickled)


def raise_failure(failure: Failure, *, where: str) -> NoReturn:
    """Raise the error ``failure`` carries (its own type when it unpickles), noting ``where``."""
    err: BaseException | None = None
    if failure.pickled is not None:
        try:
            loaded = pickle.loads(failure.pickled)
        except (pickle.UnpicklingError, TypeError, AttributeError, ImportError):
            # fall back to the text
            loaded = None
        err = loaded if isinstance(loaded, Exception) else None
    if err is None:
        err = TrainError(f"{failure.type_name}: {failure.message}")
    err.add_note(f"raised in the trainer process during {where}:\n{failure.traceback}")
    raise err
