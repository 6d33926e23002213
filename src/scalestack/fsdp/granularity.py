"""Granularity: the smallest run of a tensor's elements that must stay on one rank.

A granule is expressed in elements of the flattened tensor. Rows are the trailing dimensions
(``prod(shape[1:])``), so a ``[out, in]`` weight has rows of ``in`` elements and a 1-D vector has rows of
one element.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch

GranularitySpec = str | int
GranularityRule = GranularitySpec | Callable[[str, torch.Tensor], GranularitySpec] | None

_NAMED = ("element", "row", "tensor")


def row_length(shape: Sequence[int]) -> int:
    """Elements in one row (all dimensions but the first); 1 for 0-D and 1-D tensors."""
    return math.prod(shape[1:]) if len(shape) > 1 else 1


def check_granularity(spec: object, where: str = "granularity") -> GranularitySpec:
    """Validate one granularity value and return it; raise a ValueError naming the fix otherwise."""
    if isinstance(spec, bool) or not isinstance(spec, (str, int)):
        raise ValueError(
            f"{where}: unknown granularity {spec!r}; use 'element', 'row', 'tensor' or a positive int k "
            "(blocks of k rows)"
        )
    if isinstance(spec, str) and spec not in _NAMED:
        raise ValueError(
            f"{where}: unknown granularity {spec!r}; use 'element', 'row', 'tensor' or a positive int k "
            "(blocks of k rows)"
        )
    if isinstance(spec, int) and spec <= 0:
        raise ValueError(f"{where}: a block granularity must be a positive number of rows, got {spec}")
    return spec


def granule_elements(spec: GranularitySpec, shape: Sequence[int]) -> int:
    """The granule of one tensor, in elements; window boundaries may cut the tensor only at multiples."""
    numel = math.prod(shape)
    if numel == 0:
        return 1
    spec = check_granularity(spec)
    if spec == "element":
        return 1
    if spec == "tensor":
        return numel
    rows = shape[0] if len(shape) > 1 else numel
    row = row_length(shape)
    if spec == "row":
        return row
    # k rows: the last block of a tensor whose row count is not a multiple of k is shorter, so the
    # boundaries that must be respected are multiples of k rows; a granule larger than the tensor is the
    # whole tensor.
    return min(spec, rows) * row


def resolve_granularity(rule: GranularityRule, name: str, param: torch.Tensor) -> GranularitySpec:
    """Apply a unit-wide rule (a value, a callable ``(name, param) -> value`` or None) to one parameter."""
    if rule is None:
        return "element"
    if callable(rule):
        return check_granularity(rule(name, param), f"granularity({name!r})")
    return check_granularity(rule)
