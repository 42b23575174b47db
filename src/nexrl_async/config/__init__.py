"""Recipe configuration: msgspec schema, TOML loading, ``extends``, ``--set`` overrides, checks.

Owns: the whole recipe surface as frozen Structs, and :func:`load_recipe`.
Must not import: torch, transformers, or any ``nexrl_async`` subpackage but ``core``.
"""
