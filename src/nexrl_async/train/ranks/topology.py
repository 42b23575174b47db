"""Where this process sits among the training ranks, and the process groups they talk over.

```
topology = Topology.from_env()                  # torchrun's RANK, WORLD_SIZE, LOCAL_RANK, ...
groups = init_process_groups(topology, device="auto", timeout_s=cfg.trainer.collective_timeout_s,
                             status_timeout_s=cfg.trainer.step_timeout_s + ...)
...
destroy(groups)
```

A plain process (no torchrun, or ``WORLD_SIZE=1``) is world size 1: no process group is
created and every collective in ``train`` is an identity. At world size ``N > 1`` three groups
exist:

- the default group (gloo on CPU; ``cpu:gloo,cuda:nccl`` on GPU, so CPU tensors still reduce
  over gloo): FSDP2's collectives, loss denominators and metric sums. Timeout
  ``trainer.collective_timeout_s``.
- ``control`` (gloo): the status every rank reports after each command (:mod:`.ranks`). Its
  timeout covers a whole step plus one collective timeout, so a rank that failed early waits
  for the others to notice (their collectives time out) instead of timing out first.
- ``command`` (gloo): the commands rank 0 broadcasts. Followers wait on it between steps, while
  rank 0 runs rollouts, so its timeout is long (``idle_timeout_s``, default a week); a rank 0
  that dies closes its sockets and the followers' wait fails at once.

Rows of a batch are dealt to ranks by :func:`split_rows` (balanced by tokens, deterministic, so
every rank computes the same split without talking).
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from loguru import logger
from torch.distributed import ProcessGroup
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from nexrl_async.config.training import TrainerConfig
from nexrl_async.core.errors import ConfigError, TrainError
from nexrl_async.core.process import mark_unsafe_teardown
from nexrl_async.core.records import TrainBatch
from nexrl_async.train.model_loading import resolve_device
from nexrl_async.train.packing_plan import balance_ranks

IDLE_TIMEOUT_S = 7 * 24 * 3600.0
"""How long a follower waits for rank 0's next command (rank 0 may roll out for a long time)."""


@dataclass(frozen=True)
class Topology:
    """This process's place among the training ranks (torchrun's environment)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    master_addr: str | None = None
    master_port: int | None = None

    def __post_init__(self) -> None:
        if self.world_size < 1 or not 0 <= self.rank < self.world_size:
            raise ConfigError(f"rank {self.rank} is not in a world of size {self.world_size}")
        if self.local_world_size < 1 or not 0 <= self.local_rank < self.local_world_size:
            raise ConfigError(
                f"local rank {self.local_rank} is not in a node of {self.local_world_size} ranks"
            )

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Topology:
        """Read ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``LOCAL_WORLD_SIZE``, ``MASTER_ADDR``
        and ``MASTER_PORT``; without ``WORLD_SIZE`` this is a plain world-size-1 process.

        Raises:
            ConfigError: a variable is malformed, or ``RANK`` is missing in a larger world.
        """
        env = os.environ if environ is None else environ
        world_size = _env_int(env, "WORLD_SIZE", 1)
        if world_size > 1 and "RANK" not in env:
            raise ConfigError(f"WORLD_SIZE={world_size} but RANK is not set (launch with torchrun)")
        rank = _env_int(env, "RANK", 0)
        local_rank = _env_int(env, "LOCAL_RANK", rank if world_size > 1 else 0)
        port = env.get("MASTER_PORT")
        return cls(
            rank=rank,
            world_size=world_size,
            local_rank=local_rank,
            local_world_size=_env_int(env, "LOCAL_WORLD_SIZE", max(local_rank + 1, 1)),
            master_addr=env.get("MASTER_ADDR"),
            master_port=_env_int(env, "MASTER_PORT", 0) if port is not None else None,
        )

    @property
    def distributed(self) -> bool:
        """More than one rank."""
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Global rank 0 (the one that runs the event loop)."""
        return self.rank == 0


def _env_int(env: Mapping[str, str], name: str, default: int) -> int:
    raw = env.get(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise ConfigError(f"environment variable {name}={raw!r} is not an integer") from None


@dataclass(frozen=True)
class ProcessGroups:
    """The process groups of one training process (all ``None`` at world size 1)."""

    topology: Topology
    device: torch.device
    """This rank's training device (``cuda:<local rank>`` on GPU)."""
    control: ProcessGroup | None = None
    """gloo group for per-command status (timeout: a step plus a collective)."""
    command: ProcessGroup | None = None
    """gloo group for rank 0's command broadcasts (timeout: ``idle_timeout_s``)."""
    mesh: DeviceMesh | None = None
    """1-D device mesh over all ranks (FSDP2)."""

    @property
    def rank(self) -> int:
        return self.topology.rank

    @property
    def world_size(self) -> int:
        return self.topology.world_size

    @property
    def distributed(self) -> bool:
        return self.topology.distributed


def training_device(topology: Topology, device: torch.device | str) -> torch.device:
    """``device`` (``auto``/``cpu``/``cuda`` or a torch device) as this rank's device.

    CUDA becomes ``cuda:<local rank>`` when several ranks share a node.

    Raises:
        ConfigError: CUDA was asked for but is not available.
    """
    resolved = resolve_device(device) if isinstance(device, str) else device
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError("trainer.device = 'cuda' but CUDA is not available")
        index = resolved.index if resolved.index is not None else topology.local_rank
        return torch.device("cuda", index)
    return resolved


def init_process_groups(
    topology: Topology,
    *,
    device: torch.device | str,
    timeout_s: float,
    status_timeout_s: float | None = None,
    idle_timeout_s: float = IDLE_TIMEOUT_S,
) -> ProcessGroups:
    """Create the default, control and command groups (nothing at world size 1).

    Every rank must call this, in the same order as its other group creations. The default
    group is reused when it already exists.

    Args:
        topology: this process's place (:meth:`Topology.from_env`).
        device: training device; CUDA uses NCCL for CUDA tensors (and sets the current device).
        timeout_s: collective timeout of the default group (``trainer.collective_timeout_s``).
        status_timeout_s: the control group's timeout; defaults to ``2 · timeout_s``. Make it
            longer than a step plus ``timeout_s`` (see the module docstring).
        idle_timeout_s: the command group's timeout (a follower's wait for the next command).

    Raises:
        TrainError: the process groups could not be created (unreachable master, timeout).
    """
    target = training_device(topology, device)
    if not topology.distributed:
        return ProcessGroups(topology=topology, device=target)
    if target.type == "cuda":
        torch.cuda.set_device(target)
    backend = "cpu:gloo,cuda:nccl" if target.type == "cuda" else "gloo"
    status_s = status_timeout_s if status_timeout_s is not None else 2 * timeout_s
    try:
        if not dist.is_initialized():
            dist.init_process_group(
                backend=backend,
                rank=topology.rank,
                world_size=topology.world_size,
                timeout=timedelta(seconds=timeout_s),
            )
        control = dist.new_group(backend="gloo", timeout=timedelta(seconds=status_s))
        command = dist.new_group(backend="gloo", timeout=timedelta(seconds=idle_timeout_s))
        mesh = init_device_mesh(target.type, (topology.world_size,))
    except (RuntimeError, ValueError) as err:
        raise TrainError(
            f"rank {topology.rank}/{topology.world_size}: cannot create the process groups "
            f"(master {topology.master_addr}:{topology.master_port}): {err}"
        ) from err
    logger.debug(
        "rank {}/{}: process groups ready ({} on {})",
        topology.rank,
        topology.world_size,
        backend,
        target,
    )
    return ProcessGroups(
        topology=topology, device=target, control=control, command=command, mesh=mesh
    )


def destroy(groups: ProcessGroups) -> None:
    """Tear down every process group this process created (no-op at world size 1)."""
    if groups.distributed and dist.is_initialized():
        dist.destroy_process_group()


def status_timeout_s(cfg: TrainerConfig) -> float:
    """The control group's timeout for ``cfg``: one step plus one collective timeout."""
    return cfg.step_timeout_s + cfg.collective_timeout_s


@contextmanager
def open_process_groups(
    cfg: TrainerConfig, environ: Mapping[str, str] | None = None
) -> Iterator[ProcessGroups]:
    """:func:`init_process_groups` from torchrun's environment and ``[trainer]``, destroyed on
    exit."""
    topology = Topology.from_env(environ)
    groups = init_process_groups(
        topology,
        device=cfg.device,
        timeout_s=cfg.collective_timeout_s,
        status_timeout_s=status_timeout_s(cfg),
    )
    try:
        yield groups
    finally:
        destroy(groups)
        if groups.distributed:
            # A gloo transport may still hold a receive posted for a peer's next message; its
            # C++ destructor at interpreter exit then aborts the process (SIGABRT, seen in about
            # 1 run in 5 of the 2-rank tests): the entry point ends with os._exit instead.
            mark_unsafe_teardown("torch.distributed process groups were open")


# ---- which rows each rank trains --------------------------------------------------------------


def split_rows(lengths: Sequence[int], world_size: int) -> list[list[int]]:
    """Deal rows (token counts, each >= 1) to ``world_size`` ranks with nearly equal token
    totals: :func:`nexrl_async.train.packing_plan.balance_ranks` (longest row first, to the
    lightest rank, lower rank on ties; ascending indices per rank; some ranks get none when
    rows are fewer than ranks). The one place the trainer splits rows over ranks.
    """
    return balance_ranks(lengths, world_size)


def split_for_ranks(batch: TrainBatch, world_size: int) -> list[list[int]]:
    """:func:`split_rows` over the batch's trajectories (indices into
    ``batch.trajectories``, weighted by their token counts)."""
    return split_rows([traj.num_tokens for traj in batch.trajectories], world_size)
