"""Resume: continue a run from a checkpoint folder as if it had never stopped.

``nexrl-async run RECIPE --resume auto`` picks the newest complete checkpoint of the run folder
(``--output`` or ``run.output_dir``), or starts fresh when there is none; ``--resume PATH``
names a checkpoint folder. The run folder is reused and its records are appended to; the
ledger gets ``run_started(resumed_from=...)`` and, once the state is back, ``run_resumed``.

Restore order (each step's checks need the ones before):

1. trainer: model, optimizer, scheduler, steps done, KL controller (DCP), loaded into a trainer
   built from the recipe (so the reference model is the initial weights again);
2. serving weights: the restored policy is exported to ``<run>/weights/v<N>`` and the servers
   are launched from it with ``--weight-version N`` (attached servers load it with
   ``/update_weights_from_disk``): the fleet serves exactly the checkpoint's policy version;
3. staleness gate: version ``N``, outstanding leases, counters;
4. pool: its groups (their leases must be outstanding in the gate);
5. data cursor: epoch, position and the replay queue as saved;
6. orphans: leases outstanding without a pooled group were in flight, and their work died with
   the old process: they are released and their items queued for replay in lease order, after
   the cursor's own queue (restoring the cursor after this would wipe those replays);
7. RNG: Python's and torch's global generators.

Training continues at step ``N``: the next batch is step ``N``'s, the next publication is
version ``N + 1``, and pooled groups keep their leases' deadlines, so the staleness bound holds
across the resume as it does within a run.

What "exact" means. Concurrent rollouts finish in a timing-dependent order, so which groups a
step trains is not reproducible even without an interruption; what is reproducible is the
*admission order*: the item keys in the order the gate leased them (``admitted`` events by
lease id), which depends only on the data cursor and the replay queue. A checkpoint after ``N``
steps records ``L`` (leases issued so far: lease ids ``0..L-1``), ``F`` (keys of the leases in
flight, in lease order) and ``q`` (items already queued for replay). Let ``A1`` be the keys the
first process admitted with lease ids below ``L`` (what it admitted later is lost with it: those
lease ids are issued again), and ``A2`` the keys the resumed process admits (lease ids ``L``,
``L+1``, ...). Then:

(a) ``A2[q : q + |F|] == F``: the in-flight items are admitted again, right after the replays
    already queued, in their original order;
(b) ``A1 + (A2 without that block) == A_U[: L + |A2| - |F|]`` where ``A_U`` is the admission
    order of the uninterrupted run: apart from re-admitting the in-flight items, the resumed
    process admits exactly what the uninterrupted run admits next.

(b) is exact when neither run replays items (no failed or overdue-dropped groups); a replay is
itself timing-dependent (it enters the queue when its group fails), in one run or two.
:func:`stitched_admissions` computes the left side of (b) for a chain of resumes (each
resumed process contributes its leases up to the next checkpoint's ``L``) and checks (a).
"""

from __future__ import annotations

import re
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import msgspec
from loguru import logger

from nexrl_async.config.inference import InferenceConfig, LocalInference, SGLangInference
from nexrl_async.config.schema import RecipeConfig
from nexrl_async.core.errors import CheckpointError, ConfigError
from nexrl_async.core.protocols import PolicyTrainer
from nexrl_async.engine.checkpointer import (
    ENGINE_FILE,
    EngineState,
    list_checkpoints,
    read_engine_state,
)
from nexrl_async.engine.flow import Flow
from nexrl_async.obs.ledger import Admitted
from nexrl_async.train.checkpoint import set_rng_state

AUTO = "auto"


@dataclass(frozen=True, kw_only=True)
class Resume:
    """A checkpoint to resume from, with its engine state read."""

    path: Path
    state: EngineState

    @property
    def step(self) -> int:
        return self.state.step

    @property
    def version(self) -> int:
        return self.state.version

    @classmethod
    def load(cls, path: Path) -> Resume:
        return cls(path=path, state=read_engine_state(path))


def find_checkpoint(checkpoints_dir: Path, resume: str) -> Path | None:
    """``auto``: the newest complete checkpoint in ``checkpoints_dir`` (``None``: start fresh).

    Anything else is the path of a checkpoint folder, which must be complete.
    """
    if resume == AUTO:
        found = list_checkpoints(checkpoints_dir)
        return found[-1][1] if found else None
    path = Path(resume)
    if not (path / ENGINE_FILE).is_file():
        raise ConfigError(f"--resume {resume}: not a complete checkpoint folder", path="resume")
    return path


def abandon_newer(checkpoints_dir: Path, step: int) -> None:
    """Move this folder's checkpoints newer than ``step`` aside (``auto`` must not pick them).

    Resuming from an older checkpoint starts a new timeline; the newer checkpoints of the old
    one are kept, renamed ``abandoned-<time>.step_<N>``.
    """
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for found, path in list_checkpoints(checkpoints_dir):
        if found > step:
            target = path.with_name(f"abandoned-{stamp}.{path.name}")
            path.rename(target)
            logger.warning("checkpoint {} is newer than the resumed one: moved to {}", path, target)


RESUME_BOUND = (
    "model",
    "tokenizer",
    "data",
    "run.seed",
    "rollout.group_size",
    "pool.batch_groups",
    "staleness",
    "algorithm.mode",
)
"""Recipe fields a checkpoint's state depends on (weights, cursor, gate and pool); a resumed
run must not change them. Everything else may change on resume (``run.total_steps``,
``optim``, ``logging``, ``validation``, ``inference``, ...)."""


def check_resumable(previous: RecipeConfig, current: RecipeConfig) -> None:
    """Refuse a resume whose recipe changed a field in :data:`RESUME_BOUND`.

    Raises:
        ConfigError: naming every changed field (exit code 2).
    """
    changed = [path for path in RESUME_BOUND if _at(previous, path) != _at(current, path)]
    if changed:
        raise ConfigError(
            f"--resume: the checkpoint's state depends on {', '.join(changed)}, which the recipe "
            f"changed since the run started; resume with the original values (changes to any "
            f"other field, e.g. run.total_steps, optim, logging or validation, are accepted)",
            path=changed[0],
        )


def _at(cfg: RecipeConfig, path: str) -> object:
    value: object = cfg
    for name in path.split("."):
        value = getattr(value, name)
    return value


def restore_trainer(trainer: PolicyTrainer, resume: Resume) -> None:
    """Step 1 (blocking): load the trainer state; steps done must match the checkpoint."""
    if not resume.state.trainer:
        raise CheckpointError(f"{resume.path} holds no trainer state")
    trainer.load_checkpoint(resume.path)  # at world size > 1 every rank loads its shards
    if trainer.steps_done != resume.step:
        raise CheckpointError(
            f"{resume.path}: trainer state after {trainer.steps_done} steps, "
            f"engine state after {resume.step}"
        )


def serving_folder(weights_dir: Path, resume: Resume, export: Callable[[Path], object]) -> Path:
    """Step 2 (blocking): export the restored policy for the servers; drop stale versions.

    ``export`` is the trainer's ``save_hf``. Weight folders of the old process are removed:
    no server uses them any more.
    """
    target = weights_dir / f"v{resume.version}"
    if weights_dir.is_dir():
        for path in weights_dir.iterdir():
            if re.fullmatch(r"v\d+(\.tmp)?", path.name) and path != target:
                shutil.rmtree(path, ignore_errors=True)
    export(target)
    return target


def resumed_inference(cfg: InferenceConfig, model_dir: Path, version: int) -> InferenceConfig:
    """The ``[inference]`` section that launches servers on the checkpoint's weights.

    Attached servers are not launched: the engine loads the weights into them instead.
    """
    if isinstance(cfg, LocalInference | SGLangInference):
        args = [*cfg.extra_args, "--weight-version", str(version)]
        cfg = msgspec.structs.replace(cfg, extra_args=args)
    if isinstance(cfg, SGLangInference):
        cfg = msgspec.structs.replace(cfg, model_path=str(model_dir))
    return cfg


def restore_flow(flow: Flow, resume: Resume) -> None:
    """Steps 3 to 7: gate, pool, data cursor, orphans replayed, RNG."""
    orphans = flow.restore(resume.state.flow)
    set_rng_state(resume.state.rng)
    logger.info(
        "resumed from {} at step {} (version {}): {} pooled groups, {} in-flight items replayed",
        resume.path,
        resume.step,
        resume.version,
        flow.pool.size,
        len(orphans),
    )


# ---- the exactness invariant ----------------------------------------------------------------


class AdmissionPoint(msgspec.Struct, frozen=True, kw_only=True):
    """What a checkpoint says about admissions: ``L``, ``F`` and ``q`` of the docstring."""

    leases_issued: int
    in_flight: list[str]
    queued_replays: int

    @classmethod
    def of(cls, state: EngineState) -> AdmissionPoint:
        flow = state.flow
        issued = flow.gate.get("next_lease_id")
        if not isinstance(issued, int):
            raise CheckpointError("checkpoint gate state lacks next_lease_id")
        return cls(
            leases_issued=issued,
            in_flight=[flow.items[lease].key for lease in flow.in_flight],
            queued_replays=flow.queued_replays or 0,
        )


def stitched_admissions(
    runs: Sequence[Sequence[Admitted]], points: Sequence[AdmissionPoint]
) -> list[str]:
    """The admission order a chain of resumed processes amounts to (left side of (b)).

    ``runs[i]``: the ``admitted`` events of process ``i``; ``points[i]``: the checkpoint process
    ``i + 1`` resumed from. Process ``i`` contributes its leases from where it started up to the
    next checkpoint's ``L`` (later ones died with it), minus its re-admissions of the in-flight
    items it inherited.

    Raises:
        CheckpointError: (a) does not hold (a resumed process did not re-admit its in-flight
            items right after the queued replays, in order), or lease ids do not continue.
    """
    if len(runs) != len(points) + 1:
        raise ValueError(f"{len(runs)} processes need {len(runs) - 1} resume points")
    timeline: list[Admitted] = []
    readmitted: set[int] = set()
    for index, events in enumerate(runs):
        start = points[index - 1].leases_issued if index else 0
        end = points[index].leases_issued if index < len(points) else None
        mine = sorted((e for e in events if end is None or e.lease_id < end), key=_lease)
        if [e.lease_id for e in mine] != list(range(start, start + len(mine))):
            raise CheckpointError(f"process {index}: leases do not run on from {start}")
        if end is not None and len(mine) != end - start:
            raise CheckpointError(f"process {index}: did not admit leases {start}..{end - 1}")
        if index:
            block = _readmissions(mine, points[index - 1], start, index)
            readmitted.update(block)
        timeline += mine
    return [e.item_key for e in timeline if e.lease_id not in readmitted]


def _readmissions(events: list[Admitted], point: AdmissionPoint, start: int, index: int) -> range:
    """Lease ids of the in-flight items' re-admissions; checks (a)."""
    first = start + point.queued_replays
    block = range(first, first + len(point.in_flight))
    keys = [e.item_key for e in events if e.lease_id in block]
    if keys != point.in_flight[: len(keys)]:
        raise CheckpointError(
            f"process {index}: re-admitted {keys}, not the in-flight items {point.in_flight}"
        )
    return block


def _lease(event: Admitted) -> int:
    return event.lease_id
