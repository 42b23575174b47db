"""Pure torch functions of the RL math: advantages, policy losses, KL, entropy, SFT loss.

Owns: ``nexrl_async.algorithms`` (advantage estimators, aggregation, losses, KL controllers,
importance corrections). Each function documents its formula and tensor shapes.
Must not import: ``inference``, ``pipeline``, ``rollout``, ``train``, ``weights``, ``engine``.
"""
