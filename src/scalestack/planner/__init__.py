"""Planning a unit's flat buffer: everything that needs no process group.

granularity (where a tensor may be cut), layout (slots, pieces, windows), search (the planner), bare_shapes
(``plan`` on shapes alone), model_shapes (published models' shapes) and peers (other systems' padding).
"""

from .bare_shapes import plan
from .granularity import Cuts, ElementBlocks, cuts_for
from .layout import Layout, Piece, TensorSlot, TensorSpec
from .search import Plan, plan_buffers, plan_unit

__all__ = [
    "Cuts", "ElementBlocks", "Layout", "Piece", "Plan", "TensorSlot", "TensorSpec", "cuts_for", "plan", "plan_buffers",
    "plan_unit",
]  # fmt: skip
