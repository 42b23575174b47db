"""The client of one SGLang server's native HTTP API (docs/sglang_api.md is the contract).

Owns: ``sglang`` (:class:`SGLangClient`: generation), ``control`` (health, info, pause /
continue, abort, weight updates), ``transport`` + ``retry`` (deadlines, bounded jittered
retries), ``stream`` + ``sse`` + ``accumulator`` (SSE streams in cumulative and incremental
modes), ``wire`` + ``structs`` (SGLang's JSON shapes and our typed results), ``http`` (the run's
pool of HTTP connections).
Must not import: ``fleet``, ``local`` and every package above ``inference``.
"""
