"""Training: topology, model load and sharding, the train step, rank protocol, checkpoints.

Owns: everything torch does on the training ranks.
Must not import: ``inference``, ``rollout``, ``weights``, ``engine``.
"""
