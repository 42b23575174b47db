"""Weight publication from the trainer to the inference fleet (disk and distributed transports).

Owns: the publication state machine (prepare → hold → transfer → verify → flush → continue,
``publisher``) and its transports: ``disk`` (safetensors + ``/update_weights_from_disk``) and
``distributed`` (``/update_weights_from_distributed`` with the trainer's broadcast, ``group``),
and the trainer side of that broadcast (``sender``).
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
    "Targets",
    "Transport",
    "WeightPublisher",
]
