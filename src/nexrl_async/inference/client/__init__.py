"""Clients of one inference server: the :class:`GenerationBackend` protocol (``backend``) and
its implementations over SGLang's native HTTP API (docs/sglang_api.md) and vLLM's
(docs/vllm.md).

Owns: ``backend`` (the protocol), ``vllm`` + ``vllm_wire`` (:class:`VLLMClient`: vLLM's
token-in/token-out and RL routes, its JSON shapes), ``sglang`` (:class:`SGLangClient`:
generation), ``control`` (health, info, pause /
continue, abort, weight updates), ``transport`` + ``retry`` (deadlines, bounded jittered
retries), ``stream`` + ``sse`` + ``accumulator`` (SSE streams in cumulative and incremental
modes), ``wire`` + ``structs`` (SGLang's JSON shapes and our typed results), ``http`` (the run's
pool of HTTP connections).
Must not import: ``fleet``, ``local`` and every package above ``inference``.
"""
