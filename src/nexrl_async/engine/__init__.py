"""The engine: one root task group wiring data, rollouts, pool, trainer, publisher, validator.

Owns: the main loop, validation, checkpoint cadence, clean shutdown.
Must not import: ``nexrl_async.cli``.
"""
