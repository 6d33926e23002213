"""The training engine: ragged, structure-aware fully sharded data parallel."""

from .api import FSDPModule, UnshardHandle, fully_shard, layout
from .collectives import Traffic, reset_traffic, traffic
from .granularity import Cuts, cuts_for
from .layout import Layout, Piece, TensorSlot, TensorSpec
from .mixed_precision import MixedPrecision
from .plan import plan
from .planner import Plan, plan_buffers, plan_in_order, plan_unit
from .state_dict import full_state_dict, load_full_state_dict

__all__ = [
    "Cuts",
    "FSDPModule",
    "Layout",
    "MixedPrecision",
    "Piece",
    "Plan",
    "TensorSlot",
    "TensorSpec",
    "Traffic",
    "UnshardHandle",
    "full_state_dict",
    "fully_shard",
    "layout",
    "load_full_state_dict",
    "cuts_for",
    "plan",
    "plan_buffers",
    "plan_in_order",
    "plan_unit",
    "reset_traffic",
    "traffic",
]
