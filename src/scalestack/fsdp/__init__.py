"""The training engine: ragged, structure-aware fully sharded data parallel."""

from .api import FSDPModule, UnshardHandle, fully_shard, layout
from .collectives import Traffic, reset_traffic, traffic
from .layout import Layout, Piece, TensorSlot, TensorSpec, plan_in_order
from .mixed_precision import MixedPrecision
from .state_dict import full_state_dict, load_full_state_dict

__all__ = [
    "FSDPModule",
    "Layout",
    "MixedPrecision",
    "Piece",
    "TensorSlot",
    "TensorSpec",
    "Traffic",
    "UnshardHandle",
    "full_state_dict",
    "fully_shard",
    "layout",
    "load_full_state_dict",
    "plan_in_order",
    "reset_traffic",
    "traffic",
]
