"""Granularity: where a tensor may be cut between ranks.

A tensor's allowed cut points (positions in its flattened elements) are periodic: position p is allowed
iff ``p % period`` is one of ``offsets``. The common cases have one offset (every multiple of a granule):
element (1), row (the last dimension), a block of k rows, a matrix (the last two dimensions), the whole
tensor, or a block of k elements of the flattened tensor (``ElementBlocks(k)``: block-wise quantized
optimizer state, whose blocks must each sit on one rank). A fused tensor such as MoE experts
``[E, out, in]`` keeps its inner structure: k-row blocks restart at every expert, so when ``out % k != 0``
the allowed cuts are the block starts of each expert matrix.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class ElementBlocks:
    """Cut only at multiples of ``size`` elements of the flattened tensor (the last block may be shorter)."""

    size: int

    def __post_init__(self) -> None:
        if isinstance(self.size, bool) or not isinstance(self.size, int) or self.size <= 0:
            raise ValueError(f"ElementBlocks(size) needs a positive int number of elements, got {self.size!r}")


GranularitySpec = str | int | ElementBlocks
GranularityRule = GranularitySpec | Callable[[str, torch.Tensor], GranularitySpec] | None

_NAMED = ("element", "row", "matrix", "tensor")
_HELP = "use 'element', 'row', 'matrix', 'tensor', a positive int k (blocks of k rows) or ElementBlocks(k)"


@dataclass(frozen=True)
class Cuts:
    """Allowed cut positions of one tensor: ``p`` with ``p % period in offsets`` (offsets sorted, from 0)."""

    period: int
    offsets: tuple[int, ...] = (0,)

    def allows(self, position: int) -> bool:
        r = position % self.period
        return r == 0 if len(self.offsets) == 1 else r in self.offsets

    def spans(self, S: int) -> bool:
        """Whether two window boundaries S apart can both be allowed cuts of this tensor."""
        if len(self.offsets) == 1:
            return S % self.period == 0
        return S % self.period in self._steps

    @functools.cached_property
    def _steps(self) -> frozenset[int]:
        return frozenset((b - a) % self.period for a in self.offsets for b in self.offsets)

    @property
    def largest_granule(self) -> int:
        """The longest run between two allowed cuts: it must fit in one window."""
        bounds = (*self.offsets, self.period)
        return max(b - a for a, b in zip(bounds, bounds[1:]))

    @staticmethod
    def every(granule: int) -> Cuts:
        return Cuts(max(int(granule), 1), (0,))


def row_length(shape: Sequence[int]) -> int:
    """Elements in one row: the last dimension of a matrix (or stack of matrices); 1 for 0-D and 1-D."""
    return int(shape[-1]) if len(shape) > 1 else 1


def check_granularity(spec: object, where: str = "granularity") -> GranularitySpec:
    """Validate one granularity value and return it; raise a ValueError naming the fix otherwise."""
    if isinstance(spec, ElementBlocks):
        return spec
    if isinstance(spec, bool) or not isinstance(spec, (str, int)) or (isinstance(spec, str) and spec not in _NAMED):
        raise ValueError(f"{where}: unknown granularity {spec!r}; {_HELP}")
    if isinstance(spec, int) and spec <= 0:
        raise ValueError(f"{where}: a block granularity must be a positive number of rows, got {spec}")
    return spec


def cuts_for(spec: GranularitySpec, shape: Sequence[int]) -> Cuts:
    """The allowed cuts of a tensor of ``shape`` under one granularity value."""
    return _cuts_for(check_granularity(spec), tuple(shape))


@functools.lru_cache(maxsize=65536)
def _cuts_for(spec: GranularitySpec, shape: tuple[int, ...]) -> Cuts:
    """Memoized: a model repeats a few shapes thousands of times (Cuts are immutable values, safe to share)."""
    numel = math.prod(shape)
    if numel == 0 or spec == "element":
        return Cuts.every(1)
    if isinstance(spec, ElementBlocks):
        return Cuts.every(min(spec.size, numel))
    if spec == "tensor" or len(shape) <= 1 and spec == "matrix":
        return Cuts.every(numel)
    if len(shape) <= 1:  # a vector's rows are its elements
        return Cuts.every(1 if spec == "row" else min(spec, numel))
    row, rows = int(shape[-1]), int(shape[-2])
    matrix = row * rows
    if spec == "row":
        return Cuts.every(row)
    if spec == "matrix":
        return Cuts.every(matrix)
    k = min(spec, rows)
    if rows % k == 0:
        return Cuts.every(k * row)
    return Cuts(matrix, tuple(j * k * row for j in range(-(-rows // k))))


def resolve_granularity(rule: GranularityRule, name: str, param: torch.Tensor) -> GranularitySpec:
    """Apply a unit-wide rule (a value, a callable ``(name, param) -> value`` or None) to one parameter."""
    if rule is None:  # elements: zero padding at any W; pieces keep their dimensions anyway (fsdp/param.py)
        return "element"
    if callable(rule):
        return check_granularity(rule(name, param), f"granularity({name!r})")
    return check_granularity(rule)
