"""Talking to inference servers.

Owns three rooms:

- ``client/``: the ``GenerationBackend`` protocol and its HTTP clients, SGLang's and vLLM's
  (generation, control endpoints, transport with deadlines and bounded retries, SSE streams,
  the run's HTTP pool);
- ``fleet/``: the servers a run uses (the backend registry, launch or attach, health, restart,
  routing);
- ``local/``: our SGLang-compatible server on transformers for CPU and one GPU.

The simulated SGLang server (a test double) lives in ``nexrl_async.testing``.
Must not import: ``pipeline``, ``data``, ``rollout``, ``train``, ``weights``, ``engine``,
``testing``.
"""
