"""Core vocabulary of the engine: typed records, the error tree, protocols, user-code refs.

Owns: ``records`` (msgspec Structs that flow through the engine), ``errors`` (the one exception
tree), ``protocols`` (the seams between layers) and ``usercode`` (loading ``file.py:Name``).
Must not import: torch, transformers, or any other ``nexrl_async`` subpackage.
"""
