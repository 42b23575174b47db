"""Weight publication from the trainer to the inference fleet (disk and distributed transports).

Owns: the publication state machine (pause/hold → transfer → verify → flush → continue).
Must not import: ``rollout``, ``engine``.
"""
