"""The seam between the engine and one inference server: :class:`GenerationBackend`.

Every server API the engine speaks implements this protocol (NeMo RL's pattern): token ids in,
token ids out with per-token log-probs and the weight version(s) that produced them; a group's
samples of one prompt in one request; abort; pause and continue; weights loaded from a folder,
labelled with a version and verified; health and info. Results and parameters are the client's
own typed values (``structs``): :class:`SamplingParams` in SGLang's key names, which each
implementation maps to its server (and refuses, naming the key, where its server has no
equivalent).

Implementations (chosen by ``inference.backend``, see ``inference.fleet.backends``):

- :class:`~nexrl_async.inference.client.sglang.SGLangClient`: SGLang's native API, spoken by
  SGLang and by our local server (docs/sglang_api.md);
- :class:`~nexrl_async.inference.client.vllm.VLLMClient`: vLLM's token-in/token-out and RL
  routes (docs/vllm.md).

:class:`BackendControl` is the part without generation: what the weight publisher needs (so
``ServerControl``, SGLang's control endpoints alone, satisfies it too).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable

from nexrl_async.core.errors import InferenceError
from nexrl_async.inference.client.structs import (
    ControlResult,
    GenerateResult,
    ModelInfo,
    PauseMode,
    SamplingParams,
    WeightUpdateResult,
)


class BackendControl(Protocol):
    """Health, info, scheduling and weights of one server at :attr:`base_url`.

    Every call runs under ``timeout_s`` (the client's control deadline when ``None``); 4xx
    answers raise ``RequestRejected``, no answer ``EngineUnavailable``.
    """

    @property
    def base_url(self) -> str:
        """The server's base URL, without a trailing slash."""
        ...

    async def health(self, *, timeout_s: float | None = None) -> bool:
        """Whether the server answers its health route with 200."""
        ...

    async def model_info(self, *, timeout_s: float | None = None) -> ModelInfo:
        """What the server serves; ``weight_version`` is the label of its current weights."""
        ...

    async def pause_generation(
        self, mode: PauseMode = "abort", *, timeout_s: float | None = None
    ) -> None:
        """Stop generating until :meth:`continue_generation`: ``abort`` ends running requests
        (each returns its partial output with finish reason ``abort``), ``in_place`` freezes
        them; new requests wait. ``retract`` is SGLang's own (requeue)."""
        ...

    async def continue_generation(self, *, timeout_s: float | None = None) -> None:
        """Resume after :meth:`pause_generation`."""
        ...

    async def abort_request(
        self, rid: str | None = None, *, abort_all: bool = False, timeout_s: float | None = None
    ) -> None:
        """Abort the request ``rid`` (the client's id), or every request with ``abort_all``."""
        ...

    async def flush_cache(self, *, timeout_s: float | None = None) -> str:
        """Drop the prefix cache (after new weights); the server's answer as text."""
        ...

    async def update_weights_from_disk(
        self,
        model_path: str,
        *,
        weight_version: str | int | None = None,
        flush_cache: bool = True,
        timeout_s: float | None = None,
    ) -> WeightUpdateResult:
        """Load the HF folder ``model_path`` (same architecture) and label the weights
        ``weight_version``; not retried (the publisher owns the step's retries)."""
        ...

    async def update_weight_version(
        self, new_version: str | int, *, timeout_s: float | None = None
    ) -> ControlResult:
        """Relabel the current weights."""
        ...


class GenerationBackend(BackendControl, Protocol):
    """One inference server as the engine sees it: :class:`BackendControl` plus generation.

    Aborted generations are results (``finish_reason.type == "abort"`` with the partial output),
    not errors. Cancelling a generation, or its deadline passing, aborts it on the server.
    """

    async def generate(
        self,
        input_ids: Sequence[int],
        sampling: SamplingParams,
        *,
        return_logprob: bool = True,
        rid: str | None = None,
        timeout_s: float | None = None,
    ) -> GenerateResult:
        """One completion of ``input_ids`` (``sampling.n`` unset or 1)."""
        ...

    async def generate_samples(
        self,
        input_ids: Sequence[int],
        n: int,
        sampling: SamplingParams,
        *,
        return_logprob: bool = True,
        timeout_s: float | None = None,
    ) -> list[GenerateResult | InferenceError]:
        """``n`` samples of one prompt in one request (a group's first turn), in sample order;
        item ``i`` is sample ``i``'s result or the error decoding it met."""
        ...


@runtime_checkable
class PromptBatching(Protocol):
    """A backend that sends different prompts in one request (SGLang's batch form), one rid
    each: what lets the engine send the first turns of several groups together."""

    async def generate_prompts(
        self,
        prompts: Sequence[Sequence[int]],
        sampling: SamplingParams,
        *,
        rids: list[str] | None = None,
        return_logprob: bool = True,
        timeout_s: float | None = None,
    ) -> list[GenerateResult | InferenceError]:
        """One sample of each prompt; ``rids`` updated in place to the ids on the wire."""
        ...
