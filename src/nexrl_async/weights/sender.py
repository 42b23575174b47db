"""Trainer side of distributed weight updates: rank 0 of a standalone broadcast group.

The inference servers join the same group through ``/init_weights_update_group`` and receive
through ``/update_weights_from_distributed`` (docs/sglang_api.md §4.1; the server side is
``nexrl_async.inference.local.update_group``). The group is never the training job's default
process group: rank 0 hosts its own ``TCPStore`` on ``master_address:master_port`` and builds a
gloo (CPU) or NCCL (CUDA) backend behind the key prefixes SGLang's ``init_custom_process_group``
uses, so real SGLang servers rendezvous on the same keys.

::

    sender = WeightSender(master_address="127.0.0.1", master_port=0, world_size=3)
    # servers: POST /init_weights_update_group {master_port: sender.port, rank_offset: 1|2, ...}
    sender.connect()                                   # blocks until every rank joined
    buckets = plan_buckets(trainer.named_parameters_for_sync(), bucket_mb=256)
    # servers: one POST /update_weights_from_distributed per bucket, while:
    sender.send_buckets(buckets)                       # blocks until every bucket is out

Wire protocol (both sides): tensors go in the announced ``names`` order; with ``load_format``
``"flattened_bucket"`` a bucket is one ``uint8`` broadcast of its tensors' bytes concatenated
(SGLang's ``FlattenedTensorBucket``), with ``None`` one broadcast per tensor. Buckets never mix
dtypes, so either reading of a flattened bucket agrees.

Every method blocks; the weight publisher runs them in worker threads. ``abort()`` (any thread)
makes a pending ``send_buckets`` return at once with :class:`WeightSyncError`; a broadcast never
waits longer than ``timeout_s``. A group that failed is never reused (gloo cannot cancel an
operation in flight): build a new sender.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Literal, Protocol, cast

import torch
import torch.distributed as dist
from loguru import logger
from torch import Tensor
from torch._C._distributed_c10d import PrefixStore, Store, TCPStore, Work

from nexrl_async.core.errors import WeightSyncError

LoadFormat = Literal["flattened_bucket"] | None
FLATTENED: LoadFormat = "flattened_bucket"
POLL_S = 0.002
"""How often a pending broadcast checks for ``abort()`` (at most; it starts at ``FIRST_POLL_S``
and doubles, so a small bucket is not held back by a whole poll)."""
FIRST_POLL_S = 2e-5


@dataclass
class Bucket:
    """Tensors announced by one ``/update_weights_from_distributed`` call, in order."""

    names: list[str] = field(default_factory=list)
    dtypes: list[str] = field(default_factory=list)
    """torch attribute names (``"bfloat16"``), as SGLang expects."""
    shapes: list[list[int]] = field(default_factory=list)
    tensors: list[Tensor] = field(default_factory=list)
    nbytes: int = 0

    def add(self, name: str, tensor: Tensor) -> None:
        self.names.append(name)
        self.dtypes.append(str(tensor.dtype).removeprefix("torch."))
        self.shapes.append(list(tensor.shape))
        self.tensors.append(tensor)
        self.nbytes += tensor.numel() * tensor.element_size()


def plan_buckets(named_tensors: Iterable[tuple[str, Tensor]], *, bucket_mb: int) -> list[Bucket]:
    """Split ``named_tensors`` (in order) into buckets of at most ``bucket_mb`` MiB and one
    dtype each; a tensor larger than the limit gets a bucket of its own."""
    limit = bucket_mb * 2**20
    buckets: list[Bucket] = []
    for name, tensor in named_tensors:
        size = tensor.numel() * tensor.element_size()
        last = buckets[-1] if buckets else None
        if (
            last is None
            or last.tensors[0].dtype != tensor.dtype
            or (last.nbytes + size > limit and last.nbytes > 0)
        ):
            last = Bucket()
            buckets.append(last)
        last.add(name, tensor.detach())
    return buckets


class _Broadcaster(Protocol):
    def broadcast(self, tensors: list[Tensor], opts: dist.BroadcastOptions) -> Work: ...


def _store_chain(store: Store, group_name: str, device: str) -> Store:
    """SGLang's prefixes: ``<group>`` (rendezvous), ``<group>/`` (group), ``<device>/``."""
    named = PrefixStore(group_name, store)
    return PrefixStore(f"{device}/", PrefixStore(f"{group_name}/", named))


class WeightSender:
    """Rank 0 of the weight-update group ``group_name`` (see the module docstring)."""

    def __init__(
        self,
        *,
        master_address: str,
        master_port: int,
        world_size: int,
        group_name: str = "weight_update_group",
        backend: Literal["gloo", "nccl"] = "gloo",
        timeout_s: float = 300.0,
    ) -> None:
        """Host the group's store now (``master_port`` 0 picks a free port: :attr:`port`)."""
        if world_size < 2:
            raise WeightSyncError(f"world_size {world_size}: a group needs at least one server")
        self.group_name = group_name
        self.world_size = world_size
        self.backend = backend
        self.timeout_s = timeout_s
        self.device = torch.device("cpu" if backend == "gloo" else "cuda")
        self._aborted = threading.Event()
        self._group: _Broadcaster | None = None
        try:
            self._store = TCPStore(
                master_address,
                master_port,
                world_size,
                is_master=True,
                timeout=timedelta(seconds=timeout_s),
                wait_for_workers=False,
            )
        except (RuntimeError, ValueError) as err:
            raise WeightSyncError(
                f"cannot host the weight-update store on {master_address}:{master_port}: {err}"
            ) from err
        self.port = int(self._store.port)

    def connect(self) -> None:
        """Build the backend: blocks until every server rank joined (at most ``timeout_s``)."""
        timeout = timedelta(seconds=self.timeout_s)
        store = _store_chain(self._store, self.group_name, self.device.type)
        try:
            if self.backend == "gloo":
                made: object = dist.ProcessGroupGloo(store, 0, self.world_size, timeout)
            else:
                options = dist.ProcessGroupNCCL.Options()
                options._timeout = timeout
                made = dist.ProcessGroupNCCL(store, 0, self.world_size, options)
        except (RuntimeError, ValueError, AttributeError) as err:
            self._aborted.set()
            raise WeightSyncError(f"weight-update group rendezvous failed: {err}") from err
        self._group = cast(_Broadcaster, made)
        logger.info(
            "weight-update group {} ready: {} ranks on port {} ({})",
            self.group_name,
            self.world_size,
            self.port,
            self.backend,
        )

    def abort(self) -> None:
        """Make a pending or later send fail at once (thread-safe; the group is unusable)."""
        self._aborted.set()

    @property
    def usable(self) -> bool:
        return self._group is not None and not self._aborted.is_set()

    @staticmethod
    def plan(named_tensors: Iterable[tuple[str, Tensor]], *, bucket_mb: int) -> list[Bucket]:
        """:func:`plan_buckets` (what the publisher announces before :meth:`send_buckets`)."""
        return plan_buckets(named_tensors, bucket_mb=bucket_mb)

    def send(
        self,
        named_tensors: Iterable[tuple[str, Tensor]],
        *,
        bucket_mb: int,
        load_format: LoadFormat = FLATTENED,
    ) -> int:
        """Plan buckets and broadcast them (the servers must be receiving them); bytes sent."""
        return self.send_buckets(plan_buckets(named_tensors, bucket_mb=bucket_mb), load_format)

    def send_buckets(self, buckets: Sequence[Bucket], load_format: LoadFormat = FLATTENED) -> int:
        """Broadcast ``buckets`` in order; returns the payload bytes (each sent once)."""
        sent = 0
        for bucket in buckets:
            if load_format == FLATTENED:
                flat = torch.cat(
                    [
                        t.to(self.device).contiguous().view(-1).view(torch.uint8)
                        for t in bucket.tensors
                    ]
                )
                self._broadcast(flat)
            else:
                for tensor in bucket.tensors:
                    self._broadcast(tensor.to(self.device).contiguous())
            sent += bucket.nbytes
        return sent

    def _broadcast(self, tensor: Tensor) -> None:
        group = self._group
        if group is None or self._aborted.is_set():
            raise WeightSyncError(f"weight-update group {self.group_name} is not usable")
        options = dist.BroadcastOptions()
        options.rootRank = 0
        options.timeout = timedelta(seconds=self.timeout_s)
        deadline = time.monotonic() + self.timeout_s
        try:
            work = group.broadcast([tensor], options)
            poll_s = FIRST_POLL_S
            while not work.is_completed():
                if self._aborted.wait(poll_s):
                    raise WeightSyncError("weight broadcast aborted")
                if time.monotonic() > deadline:
                    self._aborted.set()
                    raise WeightSyncError(
                        f"weight broadcast not received by every server within {self.timeout_s:g} s"
                    )
                poll_s = min(2 * poll_s, POLL_S)
            work.wait()
        except RuntimeError as err:
            self._aborted.set()
            raise WeightSyncError(f"weight broadcast failed: {err}") from err

    def close(self) -> None:
        """Release the backend and the store (blocking: a backend with an operation in flight
        waits out its timeout; run in a worker thread)."""
        self._aborted.set()
        self._group = None
