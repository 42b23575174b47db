"""A real SGLang-compatible inference server on transformers (CPU or one GPU).

Owns: the ASGI app, the batched decode loop with KV cache, weight loading, ``nexrl-async serve``.
Must not import: anything above ``inference`` (``rollout``, ``train``, ``weights``, ``engine``).
"""
