"""Flow control between rollouts and the trainer: staleness gate and trajectory pool.

Owns: ``staleness`` (version-token admission, pure synchronous logic) and ``pool`` (bounded
trajectory pool, with ``pool_events``, ``pool_state``, ``partial_groups``: what failed samples
do to their group, and ``grouping``: the grouping keys of advantage baselines); none owns
tasks, locks or clients.
Must not import: torch; ``inference``, ``rollout``,
``train``, ``weights``, ``engine``.
"""
