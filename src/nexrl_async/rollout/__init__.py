"""Rollout: the worker task that runs one agent loop per sample, evaluators, tools.

Owns: the agent loop (token-exact turn appending, loss masks, max_turns), the Evaluator glue,
worker hooks (``format_query``, ``loss_mask``), and the per-sample fault boundary.
Must not import: ``train``, ``weights``, ``engine``.
"""
