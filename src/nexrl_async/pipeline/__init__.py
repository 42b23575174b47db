"""Flow control between rollouts and the trainer: staleness gate and trajectory pool.

Owns: ``staleness`` (version-token admission, pure synchronous logic) and ``pool`` (bounded
trajectory pool); both own no tasks, locks or clients.
Must not import: torch; ``inference``, ``rollout``,
``train``, ``weights``, ``engine``.
"""
