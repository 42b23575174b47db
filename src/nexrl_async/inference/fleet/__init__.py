"""The inference fleet: the servers a run uses, launched or attached, watched and routed.

Owns: ``supervisor`` (:class:`Fleet`: launch / attach, health probes, restarts),
``backends`` (the registry: ``inference.backend`` → client and launch line),
``launch`` (server commands and processes), ``router`` (least-outstanding routing with
stickiness and per-server caps).
Must not import: ``local`` (a launched local server is a subprocess) and every package above
``inference``.
"""
