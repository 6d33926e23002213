"""Optimizer-side tools that understand sharded parameters."""

from .clip import clip_grad_norm_

__all__ = ["clip_grad_norm_"]
