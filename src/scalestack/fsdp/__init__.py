"""The training engine: ragged, structure-aware fully sharded data parallel, shaped like FSDP2."""

from .api import FSDPModule, UnshardHandle, fully_shard, layout, register_fsdp_forward_method
from .collectives import Traffic, record_collectives, reset_traffic, traffic
from .materialize import materialize
from .memory import memory_summary
from .mixed_precision import MixedPrecisionPolicy
from .param import ShardInfo, shard_info
from .state_dict import full_state_dict, load_full_state_dict

__all__ = [
    "FSDPModule",
    "MixedPrecisionPolicy",
    "ShardInfo",
    "Traffic",
    "UnshardHandle",
    "full_state_dict",
    "fully_shard",
    "layout",
    "load_full_state_dict",
    "materialize",
    "memory_summary",
    "record_collectives",
    "register_fsdp_forward_method",
    "reset_traffic",
    "shard_info",
    "traffic",
]
