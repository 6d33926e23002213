"""Optimizer-side tools that understand sharded parameters."""

from .clip import clip_grad_norm_
from .grad_scaler import ShardedGradScaler

__all__ = ["ShardedGradScaler", "clip_grad_norm_"]
