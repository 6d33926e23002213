"""Layout of one unit's flat buffer: where each tensor lives and which rank holds which piece.

Every rank holds the window ``[r*S, (r+1)*S)`` of a buffer of ``W*S`` elements. A window boundary may
fall outside a tensor or on one of its granule boundaries, never inside a granule, so each rank's piece
of a tensor is a whole number of granules. Padding lives only between tensors and at the end.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

from .granularity import Cuts


@dataclass(frozen=True)
class TensorSpec:
    """What the planner needs to know of a tensor."""

    name: str
    shape: tuple[int, ...]
    cuts: Cuts  # where window boundaries may cut it

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class TensorSlot:
    """A tensor placed in the flat buffer at ``[offset, offset + numel)``."""

    name: str
    shape: tuple[int, ...]
    cuts: Cuts
    offset: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def end(self) -> int:
        return self.offset + self.numel


@dataclass(frozen=True)
class Piece:
    """The part ``[start, end)`` of a flattened tensor that one rank holds at ``local_offset`` of its shard."""

    name: str
    start: int
    end: int
    local_offset: int

    @property
    def numel(self) -> int:
        return self.end - self.start


@dataclass(frozen=True)
class Layout:
    """A unit's plan: tensor slots (in the order given to the planner), shard size S and world size W."""

    world_size: int
    shard_size: int
    slots: tuple[TensorSlot, ...]
    tensor_indices: tuple[int, ...] = ()  # which of the planner's input tensors these slots are (multi-buffer)

    @property
    def total_size(self) -> int:
        return self.world_size * self.shard_size

    @functools.cached_property
    def numel(self) -> int:  # computed once: reports ask for it per unit, and units can hold ~800 tensors
        return sum(s.numel for s in self.slots)

    @property
    def padding(self) -> int:
        return self.total_size - self.numel

    @property
    def offsets(self) -> list[int]:
        return [s.offset for s in self.slots]

    def window(self, rank: int) -> tuple[int, int]:
        self._check_rank(rank)
        return rank * self.shard_size, (rank + 1) * self.shard_size

    def pieces(self, rank: int) -> list[Piece]:
        """One piece per slot (empty where the rank holds nothing of that tensor)."""
        lo, hi = self.window(rank)
        out = []
        for s in self.slots:
            a, b = max(s.offset, lo), min(s.end, hi)
            if a < b:
                out.append(Piece(s.name, a - s.offset, b - s.offset, a - lo))
            else:
                out.append(Piece(s.name, 0, 0, 0))
        return out

    def check(self) -> None:
        """Raise if the layout breaks an invariant (overlap, out of bounds, a boundary inside a granule)."""
        S = self.shard_size
        cursor = 0
        for s in sorted(self.slots, key=lambda s: s.offset):
            if s.offset < cursor or s.end > self.total_size:
                raise AssertionError(f"slot {s.name!r} at [{s.offset}, {s.end}) overlaps or leaves the buffer")
            for k in range(s.offset // S + 1, (s.end - 1) // S + 1 if s.numel else 0):
                if not s.cuts.allows(k * S - s.offset):
                    raise AssertionError(f"window boundary {k * S} cuts a granule of {s.name!r}")
            cursor = max(cursor, s.end)

    def _check_rank(self, rank: int) -> None:
        if not 0 <= rank < self.world_size:
            raise ValueError(f"rank {rank} is outside this layout's world of {self.world_size} ranks")

    def __str__(self) -> str:
        pct = 100.0 * self.padding / max(self.total_size, 1)
        lines = [
            f"Layout: W={self.world_size} S={self.shard_size} numel={self.numel} padding={self.padding} ({pct:.2f}%)"
        ]
        for s in self.slots:
            granule = s.cuts.largest_granule
            lines.append(f"  [{s.offset:>10}, {s.end:>10})  {s.name}  shape={list(s.shape)} granule={granule}")
        return "\n".join(lines)
