"""scalestack: fully sharded data parallel training on ragged, structure-aware shards.

Shaped like PyTorch FSDP2: ``from scalestack import fully_shard, MixedPrecisionPolicy, FSDPModule`` is the
one-line switch.
"""

from . import checkpoint
from .fsdp import (
    FSDPModule,
    MixedPrecisionPolicy,
    ShardInfo,
    Traffic,
    UnshardHandle,
    full_state_dict,
    fully_shard,
    layout,
    load_full_state_dict,
    materialize,
    memory_summary,
    record_collectives,
    register_fsdp_forward_method,
    reset_traffic,
    shard_info,
    traffic,
)
from .optim import ShardedGradScaler, clip_grad_norm_
from .planner import ElementBlocks, Layout, Plan, plan
from .train import apply_fsdp

__version__ = "0.1.0"

__all__ = [
    "ElementBlocks",
    "FSDPModule",
    "Layout",
    "MixedPrecisionPolicy",
    "Plan",
    "ShardInfo",
    "ShardedGradScaler",
    "Traffic",
    "UnshardHandle",
    "apply_fsdp",
    "checkpoint",
    "clip_grad_norm_",
    "full_state_dict",
    "fully_shard",
    "layout",
    "load_full_state_dict",
    "materialize",
    "memory_summary",
    "plan",
    "record_collectives",
    "register_fsdp_forward_method",
    "reset_traffic",
    "shard_info",
    "traffic",
]
