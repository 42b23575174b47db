"""Weight publication from the trainer to the inference fleet (disk, distributed and shared).

Owns: the publication state machine (prepare → hold → transfer → verify → flush → continue,
``publisher``) and its transports: ``disk`` (safetensors + ``/update_weights_from_disk``),
``distributed`` (``/update_weights_from_distributed`` with the trainer's broadcast, ``group``),
the trainer side of that broadcast (``sender``) and ``shared`` (local servers copy a
shared-memory file, ``/update_weights_from_shared_memory``).
Must not import: ``rollout``, ``train``, ``engine`` (the trainer's parameters are injected).
"""

from nexrl_async.weights.disk import DiskTransport, Exporter
from nexrl_async.weights.distributed import DistributedTransport, ParamSource
from nexrl_async.weights.group import BroadcastGroup, Sender, SenderFactory
from nexrl_async.weights.publisher import (
    Publisher,
    PublishStats,
    Routing,
    Transport,
    WeightPublisher,
)
from nexrl_async.weights.shared import SharedTransport, Stage, staging_of
from nexrl_async.weights.steps import Targets

__all__ = [
    "BroadcastGroup",
    "DiskTransport",
    "DistributedTransport",
    "Exporter",
    "ParamSource",
    "PublishStats",
    "Publisher",
    "Routing",
    "Sender",
    "SenderFactory",
    "SharedTransport",
    "Stage",
    "Targets",
    "Transport",
    "WeightPublisher",
    "staging_of",
]
