"""scalestack: fully sharded data parallel training on ragged, structure-aware shards.

Shaped like PyTorch FSDP2: ``from scalestack import fully_shard`` is the one-line switch.
"""

from .fsdp import (
    FSDPModule,
    Layout,
    MixedPrecision,
    Plan,
    UnshardHandle,
    full_state_dict,
    fully_shard,
    layout,
    load_full_state_dict,
    plan,
    reset_traffic,
    traffic,
)
from .optim import clip_grad_norm_

__version__ = "0.1.0"

__all__ = [
    "FSDPModule",
    "Layout",
    "MixedPrecision",
    "Plan",
    "UnshardHandle",
    "clip_grad_norm_",
    "full_state_dict",
    "fully_shard",
    "layout",
    "load_full_state_dict",
    "plan",
    "reset_traffic",
    "traffic",
]
