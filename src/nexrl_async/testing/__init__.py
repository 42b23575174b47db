"""Test doubles shipped with the package, for tests and benchmarks (never imported by the engine).

Owns: the simulated SGLang server (``simulated`` and its ``simulated_*`` parts): SGLang's native
HTTP shapes with no model, honest about time, with fault hooks. Run it as a process with
``python -m nexrl_async.testing.simulated`` or mount its ASGI app on an ``httpx`` transport.
Must not import: ``engine``, ``rollout``, ``train``, ``weights``.
"""
