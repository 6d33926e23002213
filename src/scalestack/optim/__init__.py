"""Optimizers and optimizer-side tools that understand sharded parameters.

adamw8bit (AdamW with block-wise 8-bit moments aligned to the global tensor) on quantization (the code
maps); muon (distributed Muon) on muon_exchange (owners and the all-to-all plan) and newton_schulz;
param_groups (the Muon / AdamW split); clip and grad_scaler (sharded clipping and loss scaling).
"""

from .adamw8bit import AdamW8bit
from .clip import clip_grad_norm_
from .grad_scaler import ShardedGradScaler
from .muon import Muon
from .param_groups import muon_param_groups

__all__ = ["AdamW8bit", "Muon", "ShardedGradScaler", "clip_grad_norm_", "muon_param_groups"]
