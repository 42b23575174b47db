"""Talking to inference servers: the SGLang HTTP client, the server fleet, the local server.

Owns:
- the client: ``client`` (generation), ``control`` (health, info, pause/continue, abort, weight
  updates), ``transport`` + ``retry`` (deadlines, bounded jittered retries), ``stream`` +
  ``sse`` + ``accumulator`` (SSE streams in cumulative and incremental modes), ``wire`` +
  ``types`` (SGLang's JSON shapes and our typed results);
- the fleet: ``fleet`` (launch / attach / health / restart), ``launch`` (commands, processes),
  ``router`` (least-outstanding routing with stickiness and per-server caps);
- ``local/``: our SGLang-compatible server on transformers for CPU and one GPU;
- ``simulated*``: a simulated SGLang server (documented response shapes, latency, faults) for
  tests and benchmarks.
Must not import: ``pipeline``, ``data``, ``rollout``, ``train``, ``weights``, ``engine``.
"""
