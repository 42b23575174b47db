"""Talking to inference servers: the SGLang HTTP client, the server fleet, the local server.

Owns: ``client`` (async SGLang client), ``fleet`` (launch / attach / health / restart / route),
``local/`` (our SGLang-compatible server on transformers for CPU and one GPU).
Must not import: ``pipeline``, ``data``, ``rollout``, ``train``, ``weights``, ``engine``.
"""
