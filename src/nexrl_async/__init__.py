"""nexrl_async: an async, event-driven RL post-training engine for LLM agents."""

from nexrl_async.__about__ import __version__

__all__ = ["__version__"]
