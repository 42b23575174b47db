"""Flow control between rollouts and the trainer: staleness gate, trajectory pool, batching plans.

Owns: ``staleness`` (version-token admission, pure synchronous logic), ``pool`` (bounded
trajectory pool), ``packing`` (token-balanced split and micro-batch plans).
Must not import: torch at module level in ``staleness``/``pool``; ``inference``, ``rollout``,
``train``, ``weights``, ``engine``.
"""
