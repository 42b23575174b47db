"""A real SGLang-compatible inference server on transformers (CPU or one GPU).

Owns: the ASGI app, the batched decode loop with KV cache, weight loading, ``nexrl-async serve``.
Must not import: anything above ``inference`` (``rollout``, ``train``, ``weights``, ``engine``).
"""

from nexrl_async.inference.local.server import ServeOptions, main_serve, serve

__all__ = ["ServeOptions", "main_serve", "serve"]
