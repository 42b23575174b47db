"""The fleet and its backend clients, seen by rollout workers as one :class:`TurnGenerator`.

Each call leases a server for the sample's sticky key (KV reuse across turns), sends one
generation with the input ids and log-probs asked for (through the server's
:class:`GenerationBackend`: SGLang's ``/generate``, vLLM's ``/inference/v1/generate``), and
converts the answer. A group's first turn is one request for all its samples (SGLang's batch
form, vLLM's ``n``), leased for the first sample's key, and every sample's key then sticks to
the server that answered. While :meth:`FleetGenerator.serve` runs, the first turns of groups
that start together ride in one request per server (``engine.first_turns``, SGLang-API
servers). A server that goes away mid-request (``EngineUnavailable``) is
retried on a fresh lease, bounded by ``inference.retries``; a request the weight publisher cut
at a paused server's gate (``LeaseCut``: nothing came back) is sent again on a fresh lease,
spending no retry; 4xx and broken streams pass straight through to the worker's fault boundary.
"""

from __future__ import annotations

import random
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import TypeVar, cast

import anyio

from nexrl_async.config.rollout import SamplingConfig
from nexrl_async.core.errors import EngineUnavailable, GenerationError
from nexrl_async.engine.first_turns import Answer, Batch, FirstTurnBatcher
from nexrl_async.inference.client.backend import GenerationBackend, PromptBatching
from nexrl_async.inference.client.sglang import new_rid
from nexrl_async.inference.client.structs import GenerateResult, SamplingParams
from nexrl_async.inference.fleet.router import LeaseCut
from nexrl_async.inference.fleet.supervisor import Fleet
from nexrl_async.rollout.generation import GeneratedTurn

R = TypeVar("R")


def sampling_params(cfg: SamplingConfig, max_new_tokens: int) -> SamplingParams:
    """``sampling_params`` for one request, in SGLang's names (each backend maps them; stop
    tokens kept: ``no_stop_trim``)."""
    return SamplingParams(
        max_new_tokens=max_new_tokens,
        temperature=cfg.temperature,
        top_p=cfg.top_p,
        top_k=cfg.top_k,
        min_p=cfg.min_p,
        stop=list(cfg.stop) or None,
        stop_token_ids=list(cfg.stop_token_ids) or None,
        ignore_eos=cfg.ignore_eos,
        no_stop_trim=True,
        skip_special_tokens=False,
    )


class FleetGenerator:
    """Implements ``rollout.generation.TurnGenerator`` on top of the fleet."""

    def __init__(
        self,
        fleet: Fleet,
        clients: Mapping[str, GenerationBackend],
        *,
        current_version: Callable[[], int],
        retries: int,
        seed: int = 0,
        batch_window_s: float = 0.002,
        server_batch: int | None = None,
    ) -> None:
        self.fleet = fleet
        self.clients = clients
        self.current_version = current_version
        self.retries = retries
        self._rng = random.Random(seed)
        self.generated_tokens = 0
        self._group_requests = 0
        self._batches_prompts = all(isinstance(c, PromptBatching) for c in clients.values())
        self.batcher = FirstTurnBatcher(
            self._send_batch, window_s=batch_window_s, servers=self._available_servers,
            server_batch=server_batch,
        )  # fmt: skip
        """Sends the first turns of groups that start together as one request per server
        while :meth:`serve` runs (``inference.batch_first_turns``)."""

    @property
    def first_turn_requests(self) -> int:
        """Requests sent so far for groups' first turns (one per group unless batched)."""
        return self._group_requests + self.batcher.requests

    async def serve(self) -> None:
        """Run the first-turn batcher until cancelled (in the engine's task group)."""
        await self.batcher.serve()

    async def generate(
        self,
        input_ids: list[int],
        *,
        max_new_tokens: int,
        sampling: SamplingConfig,
        sticky_key: str,
    ) -> GeneratedTurn:
        params = sampling_params(sampling, max_new_tokens)
        result, url = await self._on_fleet(
            [sticky_key], lambda client: client.generate(input_ids, params)
        )
        return self._convert(result, url)

    async def generate_group(
        self,
        input_ids: list[int],
        *,
        max_new_tokens: int,
        sampling: SamplingConfig,
        sticky_keys: Sequence[str],
    ) -> list[GeneratedTurn | Exception]:
        """One request for the group (``GenerationBackend.generate_samples``); every key is then
        sticky to the server that answered."""
        params = sampling_params(sampling, max_new_tokens)
        if self.batcher.serving and self._batches_prompts:
            results, url = await self.batcher.submit(input_ids, sticky_keys, params)
        else:
            self._group_requests += 1
            n = len(sticky_keys)
            results, url = await self._on_fleet(
                sticky_keys, lambda client: client.generate_samples(input_ids, n, params)
            )
        return [r if isinstance(r, Exception) else self._convert_or_error(r, url) for r in results]

    async def _send_batch(self, batch: Batch) -> tuple[list[Answer], str]:
        """One request for ``batch`` on a leased server, its keys then sticky to that server."""

        def call(client: GenerationBackend) -> Awaitable[list[Answer]]:
            batch.client = client
            batch.rids[:] = [new_rid() for _ in batch.keys]
            return cast(PromptBatching, client).generate_prompts(
                batch.prompts, batch.params, rids=batch.rids
            )

        return await self._on_fleet(batch.keys, call)

    def _available_servers(self) -> int:
        return sum(1 for server in self.fleet.servers if server.available)

    async def _on_fleet(
        self, keys: Sequence[str], call: Callable[[GenerationBackend], Awaitable[R]]
    ) -> tuple[R, str]:
        """``call`` on a server leased for ``keys[0]`` (the other keys bound to it), retried
        on a fresh lease when the server goes away."""
        attempt = 0
        while True:
            try:
                async with self.fleet.lease(keys[0]) as server:
                    if len(keys) > 1:
                        self.fleet.stick(keys[1:], server)
                    return await call(self.clients[server.url]), server.url
            except LeaseCut:
                continue  # held at a paused gate, nothing came back: send again, no retry spent
            except EngineUnavailable:
                if attempt == self.retries:
                    raise
                await anyio.sleep(self._rng.uniform(0.1, 0.5) * 2**attempt)
                attempt += 1

    def _convert_or_error(self, result: GenerateResult, url: str) -> GeneratedTurn | Exception:
        try:
            return self._convert(result, url)
        except GenerationError as err:
            return err

    def _convert(self, result: GenerateResult, url: str) -> GeneratedTurn:
        if result.output_logprobs is None:
            raise GenerationError(f"{url} returned no logprobs")
        fallback = self.current_version()
        version = result.weight_version_int
        spans = result.version_spans(fallback)
        self.generated_tokens += len(result.output_ids)
        return GeneratedTurn(
            output_ids=result.output_ids,
            logprobs=result.output_logprobs,
            finish_reason=result.finish_reason.type,
            weight_version=fallback if version is None else version,
            versions=spans if len(spans) > 1 else [],
            server=url,
        )
