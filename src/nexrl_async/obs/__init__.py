"""Observability: loguru set-up, metrics sinks, the run ledger, the run directory, progress.

Owns: ``logs`` (rank-aware loguru, stdlib routed in), ``metrics`` (jsonl / TensorBoard / W&B),
``ledger`` (typed events appended to events.jsonl), ``rundir`` (the run folder layout).
Must not import: torch at module level; ``inference``, ``pipeline``, ``rollout``, ``train``,
``weights``, ``engine``.
"""
