"""The registry of generation backends: ``inference.backend`` → how to talk to a server (its
:class:`~nexrl_async.inference.client.backend.GenerationBackend` client) and how to launch one.

::

    backend = backend_for(cfg.inference)
    client = backend.client(url, cfg.inference, http=http)      # a GenerationBackend
    argv, env = backend.command(cfg.inference, model_dir, port, index)   # launched backends

A new backend is one module (its client, and its launch line in ``fleet.launch`` or next to
the client) plus one entry in :data:`BACKENDS`, and its ``[inference]`` variant in
``config.inference`` (a tagged union the recipe loader checks).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from nexrl_async.config.inference import AttachInference, InferenceConfig
from nexrl_async.config.tree import tag_of
from nexrl_async.core.errors import ConfigError
from nexrl_async.inference.client.backend import GenerationBackend
from nexrl_async.inference.client.http import Http
from nexrl_async.inference.client.sglang import SGLangClient
from nexrl_async.inference.client.vllm import VLLMClient
from nexrl_async.inference.fleet.launch import (
    ServerCommand,
    local_server,
    sglang_server,
    vllm_server,
)

ClientFactory = Callable[..., GenerationBackend]
"""``factory(url, inference_config, http=http)``: the client of one server."""


@dataclass(frozen=True, slots=True)
class Backend:
    """One ``inference.backend``: its client and, when the fleet launches it, its command."""

    client: ClientFactory
    command: ServerCommand | None = None
    """``None``: servers are attached (or absent), never launched."""


def _attached(url: str, cfg: InferenceConfig, *, http: Http) -> GenerationBackend:
    """An attached server's client: the one of the API it speaks (``inference.api``)."""
    api = cfg.api if isinstance(cfg, AttachInference) else "sglang"
    return BACKENDS[api].client(url, cfg, http=http)


BACKENDS: dict[str, Backend] = {
    "local": Backend(SGLangClient.from_config, local_server),
    "sglang": Backend(SGLangClient.from_config, sglang_server),
    "vllm": Backend(VLLMClient.from_config, vllm_server),
    "attach": Backend(_attached),
    "none": Backend(SGLangClient.from_config),
}
"""``inference.backend`` → :class:`Backend`."""


def backend_for(cfg: InferenceConfig) -> Backend:
    """The registered backend of ``cfg``; a :class:`ConfigError` naming the field otherwise."""
    name = tag_of(cfg)
    backend = BACKENDS.get(name)
    if backend is None:
        known = ", ".join(repr(key) for key in BACKENDS)
        raise ConfigError(f"inference.backend = {name!r}: unknown backend (known: {known})")
    return backend


def open_client(url: str, cfg: InferenceConfig, *, http: Http) -> GenerationBackend:
    """The client of the server at ``url`` for ``cfg``'s backend."""
    return backend_for(cfg).client(url, cfg, http=http)
