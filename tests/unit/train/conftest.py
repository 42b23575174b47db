"""Tiny models and batches for the trainer's unit tests (built in code, one torch thread)."""

from tiny_train import _one_thread, make_batch, make_traj, tiny_model

__all__ = ["_one_thread", "make_batch", "make_traj", "tiny_model"]
