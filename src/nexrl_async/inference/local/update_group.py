"""Weight-update process groups the server joins, and receiving tensors broadcast through them.

SGLang semantics (docs/sglang_api.md §4.1): the trainer is rank 0 and the only broadcast source;
this server joins as rank ``rank_offset``; ``world_size = 1 + every server rank``. The group is
standalone, never the process's default ``torch.distributed`` group: a ``TCPStore`` client on
``master_address:master_port`` (the trainer hosts it), wrapped in the prefixes SGLang's
``init_custom_process_group`` uses (``<group>``, ``<group>/``, ``<device>/``), under a gloo
backend (CPU tensors) or NCCL (CUDA). The trainer side is ``nexrl_async.weights.sender``.

Wire protocol of one ``/update_weights_from_distributed`` call (``names`` order is the order):

- ``load_format`` null: one broadcast per tensor, each of its announced dtype and shape;
- ``"flattened_bucket"``: one ``uint8`` broadcast of every tensor's bytes concatenated
  (SGLang's ``FlattenedTensorBucket``; dtypes may mix).

Collectives are blocking, so every method here runs in a worker thread. A receive polls its work
and stops early when the group is left (``/destroy_weights_update_group``) or its deadline
passes; gloo cannot abort an operation in flight, so a group left that way is kept (retired)
until :meth:`UpdateGroups.close`, whose release may wait out the group timeout.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Protocol, cast

import anyio
import torch
import torch.distributed as dist
from loguru import logger
from torch._C._distributed_c10d import PrefixStore, Store, TCPStore, Work

from nexrl_async.core.errors import WeightSyncError

POLL_S = 0.002
"""How often a pending receive checks for cancellation (at most; it starts at ``FIRST_POLL_S``
and doubles, so a small bucket is not held back by a whole poll)."""
FIRST_POLL_S = 2e-5

FLATTENED = "flattened_bucket"

_DTYPES = {
    "float32": torch.float32,
    "float": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "half": torch.float16,
    "float64": torch.float64,
    "int64": torch.int64,
    "int32": torch.int32,
    "int8": torch.int8,
    "uint8": torch.uint8,
    "bool": torch.bool,
}


def parse_dtype(name: str) -> torch.dtype:
    """``"bfloat16"`` / ``"torch.bfloat16"`` → ``torch.bfloat16`` (ValueError when unknown)."""
    dtype = _DTYPES.get(name.removeprefix("torch."))
    if dtype is None:
        raise ValueError(f"unsupported dtype {name!r}")
    return dtype


@dataclass(frozen=True)
class TensorSpec:
    """One announced tensor: HF name, dtype and shape."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        numel = 1
        for size in self.shape:
            numel *= size
        return numel * self.dtype.itemsize


class Broadcaster(Protocol):
    """The part of a c10d backend (gloo, NCCL) used here."""

    def broadcast(self, tensors: list[torch.Tensor], opts: dist.BroadcastOptions) -> Work: ...


def _store_chain(store: Store, group_name: str, device: str) -> Store:
    """The key prefixes SGLang's group helper puts in front of the backend's rendezvous."""
    named = PrefixStore(group_name, store)
    return PrefixStore(f"{device}/", PrefixStore(f"{group_name}/", named))


def _backend(backend: str, store: Store, rank: int, size: int, timeout: timedelta) -> Broadcaster:
    if backend == "gloo":
        return cast(Broadcaster, dist.ProcessGroupGloo(store, rank, size, timeout))
    if not dist.is_nccl_available():
        raise WeightSyncError("backend 'nccl' is not available in this torch build")
    options = dist.ProcessGroupNCCL.Options()
    options._timeout = timeout
    return cast(Broadcaster, dist.ProcessGroupNCCL(store, rank, size, options))


class UpdateGroup:
    """One joined group: a backend of ``size`` ranks in which this server is ``rank``."""

    def __init__(
        self,
        name: str,
        *,
        backend: Broadcaster,
        store: Store,
        device: torch.device,
        rank: int,
        size: int,
        timeout_s: float,
    ) -> None:
        self.name = name
        self.device = device
        self.rank = rank
        self.size = size
        self.timeout_s = timeout_s
        self._backend = backend
        self._store = store  # kept alive with the backend
        self._left = threading.Event()

    def leave(self) -> None:
        """Stop pending and future receives (thread-safe)."""
        self._left.set()

    def receive(
        self, specs: list[TensorSpec], *, load_format: str | None
    ) -> list[tuple[str, torch.Tensor]]:
        """Receive ``specs`` from rank 0, in order (blocking; one receive at a time: the
        caller serialises them, as the collectives must be matched in order anyway)."""
        if self._left.is_set():
            raise WeightSyncError(f"process group {self.name} was destroyed")
        if load_format == FLATTENED:
            return self._receive_flat(specs)
        out = [(s.name, torch.empty(s.shape, dtype=s.dtype, device=self.device)) for s in specs]
        for _, tensor in out:
            self._broadcast(tensor)
        return out

    def _receive_flat(self, specs: list[TensorSpec]) -> list[tuple[str, torch.Tensor]]:
        flat = torch.empty(sum(s.nbytes for s in specs), dtype=torch.uint8, device=self.device)
        self._broadcast(flat)
        out, start = [], 0
        for spec in specs:
            raw = flat[start : start + spec.nbytes]
            if start % spec.dtype.itemsize:  # misaligned for a typed view: copy it out
                raw = raw.clone()
            out.append((spec.name, raw.view(spec.dtype).view(spec.shape)))
            start += spec.nbytes
        return out

    def _broadcast(self, tensor: torch.Tensor) -> None:
        options = dist.BroadcastOptions()
        options.rootRank = 0
        options.timeout = timedelta(seconds=self.timeout_s)
        deadline = time.monotonic() + self.timeout_s
        try:
            work = self._backend.broadcast([tensor], options)
            poll_s = FIRST_POLL_S
            while not work.is_completed():
                if self._left.wait(poll_s):
                    raise WeightSyncError(f"process group {self.name} was destroyed mid-transfer")
                if time.monotonic() > deadline:
                    self._left.set()  # the backend still holds the operation: never reuse it
                    raise WeightSyncError(f"no broadcast from rank 0 within {self.timeout_s:g} s")
                poll_s = min(2 * poll_s, POLL_S)
            work.wait()
        except RuntimeError as err:
            self._left.set()
            raise WeightSyncError(f"broadcast in group {self.name} failed: {err}") from err


class UpdateGroups:
    """The groups this server has joined, by name (one event loop writes; threads receive)."""

    def __init__(self, *, device: torch.device, timeout_s: float) -> None:
        self.device = device
        self.timeout_s = timeout_s
        self._groups: dict[str, UpdateGroup] = {}
        self._joining: dict[str, object] = {}
        """Joins under way: name → the token :meth:`reserve` handed out."""
        self._retired: list[UpdateGroup] = []

    def __contains__(self, name: str) -> bool:
        return name in self._groups

    def get(self, name: str) -> UpdateGroup:
        group = self._groups.get(name)
        if group is None:
            raise WeightSyncError(f"Process group {name} is not initialized.")
        return group

    def reserve(self, name: str) -> object:
        """Claim ``name`` before a join starts (on the loop), so two joins cannot race; returns
        the token to :meth:`register` the outcome with."""
        if name in self._groups or name in self._joining:
            raise WeightSyncError(f"Process group {name} already exists.")
        token = object()
        self._joining[name] = token
        return token

    def join(
        self,
        name: str,
        *,
        master_address: str,
        master_port: int,
        rank: int,
        world_size: int,
        backend: str,
    ) -> UpdateGroup:
        """Connect to the trainer's store and build the backend (blocking: waits for every
        rank, at most ``timeout_s``; touches no shared state, so it runs in a worker thread).
        Call :meth:`reserve` first and :meth:`register` after."""
        if not 0 < rank < world_size:
            raise WeightSyncError(f"rank_offset {rank} must be in [1, world_size {world_size})")
        if backend not in ("gloo", "nccl"):
            raise WeightSyncError(f"backend {backend!r}: expected 'gloo' or 'nccl'")
        device = torch.device("cpu") if backend == "gloo" else self.device
        if device.type != "cuda" and backend == "nccl":
            raise WeightSyncError("backend 'nccl' needs the model on a CUDA device")
        timeout = timedelta(seconds=self.timeout_s)
        try:
            store = TCPStore(
                master_address, master_port, world_size, is_master=False, timeout=timeout
            )
            made = _backend(
                backend, _store_chain(store, name, device.type), rank, world_size, timeout
            )
        except (RuntimeError, ValueError) as err:
            raise WeightSyncError(f"cannot join {master_address}:{master_port}: {err}") from err
        logger.info(
            "joined weight-update group {} as rank {} of {} ({})", name, rank, world_size, backend
        )
        return UpdateGroup(
            name,
            backend=made,
            store=store,
            device=device,
            rank=rank,
            size=world_size,
            timeout_s=self.timeout_s,
        )

    def register(self, name: str, token: object, group: UpdateGroup | None) -> bool:
        """End a join started with :meth:`reserve` (``group`` None: it failed). False when the
        join was destroyed meanwhile: its group is retired, never used."""
        if self._joining.get(name) is not token:
            if group is not None:
                group.leave()
                self._retired.append(group)
            return False
        del self._joining[name]
        if group is not None:
            self._groups[name] = group
        return True

    def leave(self, name: str) -> None:
        """Destroy group ``name``: pending receives stop, the backend is retired. A join still
        under way is disowned (a rendezvous cannot be interrupted; it ends by its deadline), so
        a new group of the same name can be joined at once."""
        if self._joining.pop(name, None) is not None:
            logger.info("abandoned the join of weight-update group {}", name)
            return
        group = self._groups.pop(name, None)
        if group is None:
            raise WeightSyncError(f"Process group {name} does not exist.")
        group.leave()
        self._retired.append(group)
        logger.info("left weight-update group {}", name)

    def leave_all(self) -> None:
        """Leave every group (shutdown): pending receives stop at once."""
        for name in [*self._groups, *self._joining]:
            self.leave(name)

    def release(self) -> None:
        """Drop the retired backends (blocking: a backend with an operation still in flight
        waits out its timeout; run in a worker thread)."""
        retired, self._retired = self._retired, []
        retired.clear()


@dataclass
class WeightSyncState:
    """The server's distributed-update state: joined groups and the 0.5.23 update session."""

    groups: UpdateGroups
    session_open: bool = False
    """Between ``/begin_weight_update`` and ``/end_weight_update``."""
    lock: anyio.Lock = field(default_factory=anyio.Lock)
    """Serialises receives: collectives must be matched in the order they were announced."""
