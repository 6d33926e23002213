"""``scalestack.plan``: the planner on bare shapes, for tests, tools and capacity planning."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from .granularity import ElementBlocks, GranularitySpec, check_granularity, cuts_for
from .layout import Layout, TensorSpec
from .search import Plan, plan_buffers, plan_unit


def _shape(size: object, index: int) -> tuple[int, ...]:
    if isinstance(size, int) and not isinstance(size, bool):
        size = (size,)
    if not isinstance(size, (tuple, list, torch.Size)) or not all(
        isinstance(d, int) and not isinstance(d, bool) for d in size
    ):
        raise TypeError(f"sizes[{index}] must be a shape (a tuple of ints) or an int, got {size!r}")
    if any(d < 0 for d in size):
        raise ValueError(f"sizes[{index}] has a negative dimension: {tuple(size)}")
    return tuple(size)


def plan(
    sizes: Sequence[object],
    world_size: int,
    granularity: GranularitySpec | Sequence[GranularitySpec] = "element",
    align_bytes: int = 16,
    dtype: torch.dtype = torch.float32,
    max_buffers: int = 1,
) -> Layout | Plan:
    """Plan one unit of tensors with the given shapes over ``world_size`` ranks.

    ``granularity`` is one value for every tensor or a list with one per tensor ("element", "row",
    "matrix", "tensor", k rows or ``ElementBlocks(k)``). Offsets and S are multiples of ``align_bytes``
    in ``dtype``. With
    ``max_buffers=1`` returns a ``Layout`` (slots in the input's order); otherwise a ``Plan`` whose
    ``buffers`` are Layouts naming the input tensors they hold (``tensor_indices``).
    """
    if isinstance(sizes, (str, bytes)) or not isinstance(sizes, Sequence):
        raise TypeError("sizes must be a list of tensor shapes")
    shapes = [_shape(s, i) for i, s in enumerate(sizes)]
    if not isinstance(world_size, int) or isinstance(world_size, bool) or world_size <= 0:
        raise ValueError(f"world_size must be a positive int, got {world_size!r}")
    if not isinstance(dtype, torch.dtype):
        raise TypeError(f"dtype must be a torch.dtype, got {dtype!r}")
    itemsize = torch.empty((), dtype=dtype).element_size()
    if not isinstance(align_bytes, int) or align_bytes <= 0 or align_bytes % itemsize:
        raise ValueError(f"align_bytes must be a positive multiple of {dtype}'s {itemsize} bytes, got {align_bytes!r}")
    if isinstance(granularity, (str, int, ElementBlocks)):
        specs = [check_granularity(granularity)] * len(shapes)
    else:
        specs = [check_granularity(g, f"granularity[{i}]") for i, g in enumerate(granularity)]
        if len(specs) != len(shapes):
            raise ValueError(f"granularity has {len(specs)} entries for {len(shapes)} tensors; give one per tensor")
    tensors = [TensorSpec(f"t{i}", s, cuts_for(g, s)) for i, (s, g) in enumerate(zip(shapes, specs))]
    if not any(math.prod(s) for s in shapes):
        raise ValueError("nothing to plan: every tensor is empty")
    align = align_bytes // itemsize
    if max_buffers == 1:
        return plan_unit(tensors, world_size, align)
    return plan_buffers(tensors, world_size, align, max_buffers)
